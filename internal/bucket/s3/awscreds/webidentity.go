package awscreds

import (
	"errors"
	"fmt"
	"os"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// WebIdentity asks STS (AssumeRoleWithWebIdentity) for the role
// AWS_ROLE_ARN with the token in AWS_WEB_IDENTITY_TOKEN_FILE (EKS IRSA,
// CI OIDC tokens), read anew at each renewal. The STS region is
// AWS_REGION, else AWS_DEFAULT_REGION, else the cache URL's region.
type WebIdentity struct {
	URLRegion string

	inner *credentials.IAM
}

// RetrieveWithCredContext implements credentials.Provider.
func (w *WebIdentity) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	file, arn := os.Getenv("AWS_WEB_IDENTITY_TOKEN_FILE"), os.Getenv("AWS_ROLE_ARN")
	switch {
	case file == "" && arn == "":
		return credentials.Value{}, ErrNotConfigured
	case file == "" || arn == "":
		return credentials.Value{}, errors.New("AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN must both be set")
	}
	endpoint := stsEndpoint(firstSet(os.Getenv("AWS_REGION"), os.Getenv("AWS_DEFAULT_REGION"), w.URLRegion))
	// minio-go's IAM provider takes the web identity path when
	// AWS_WEB_IDENTITY_TOKEN_FILE is set, and passes AWS_ROLE_SESSION_NAME.
	w.inner = &credentials.IAM{Client: httpClient, Endpoint: endpoint}
	v, err := w.inner.RetrieveWithCredContext(&credentials.CredContext{Client: httpClient, Context: requestContext(cc)})
	if err != nil {
		return credentials.Value{}, fmt.Errorf("sts AssumeRoleWithWebIdentity %s at %s: %w", arn, endpoint, err)
	}
	return v, nil
}

// Retrieve implements credentials.Provider.
func (w *WebIdentity) Retrieve() (credentials.Value, error) { return w.RetrieveWithCredContext(nil) }

// IsExpired implements credentials.Provider.
func (w *WebIdentity) IsExpired() bool { return w.inner == nil || w.inner.IsExpired() }

// Describe implements Link.
func (w *WebIdentity) Describe() string {
	return "web identity (" + os.Getenv("AWS_ROLE_ARN") + ")"
}
