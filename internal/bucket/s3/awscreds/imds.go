package awscreds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// imdsEndpoint is the EC2 instance metadata service.
const imdsEndpoint = "http://169.254.169.254"

// IMDS gives the credentials of the EC2 instance's role from the instance
// metadata service, with an IMDSv2 session token (falling back to IMDSv1
// where the service does not hand out tokens). AWS_EC2_METADATA_DISABLED=true
// turns it off; AWS_EC2_METADATA_SERVICE_ENDPOINT points it elsewhere. It is
// not tried when the ECS container variables are set.
type IMDS struct {
	credentials.Expiry
	Endpoint string // empty: AWS_EC2_METADATA_SERVICE_ENDPOINT, then 169.254.169.254
}

// imdsTimeout bounds each request: off EC2 there is nothing to wait for.
const imdsTimeout = time.Second

// RetrieveWithCredContext implements credentials.Provider.
func (m *IMDS) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	if ecsConfigured() || strings.EqualFold(os.Getenv("AWS_EC2_METADATA_DISABLED"), "true") {
		return credentials.Value{}, ErrNotConfigured
	}
	base := strings.TrimRight(firstSet(m.Endpoint, os.Getenv("AWS_EC2_METADATA_SERVICE_ENDPOINT"), imdsEndpoint), "/")
	ctx := requestContext(cc)
	token, err := m.token(ctx, base)
	if err != nil {
		return credentials.Value{}, fmt.Errorf("instance metadata token: %w", err)
	}
	roles, err := m.get(ctx, base+"/latest/meta-data/iam/security-credentials/", token)
	if err != nil {
		return credentials.Value{}, fmt.Errorf("instance metadata role: %w", err)
	}
	role, _, _ := strings.Cut(strings.TrimSpace(string(roles)), "\n")
	if role == "" {
		return credentials.Value{}, errors.New("the instance has no role")
	}
	rctx, cancel := context.WithTimeout(ctx, imdsTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, base+"/latest/meta-data/iam/security-credentials/"+role, nil)
	if err != nil {
		return credentials.Value{}, err
	}
	if token != "" {
		req.Header.Set("X-aws-ec2-metadata-token", token)
	}
	v, err := getRoleCredentials(req)
	if err != nil {
		return credentials.Value{}, fmt.Errorf("instance metadata credentials of role %s: %w", role, err)
	}
	expiry(&m.Expiry, v.Expiration)
	return v, nil
}

// token asks for an IMDSv2 session token; an empty one (no error) means
// the service answers IMDSv1 requests only.
func (m *IMDS) token(ctx context.Context, base string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, imdsTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+"/latest/api/token", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
	resp, err := httpClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	switch {
	case err != nil:
		return "", err
	case resp.StatusCode == http.StatusOK:
		return string(b), nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusMethodNotAllowed:
		return "", nil // IMDSv1 only
	}
	return "", errors.New(resp.Status)
}

func (m *IMDS) get(ctx context.Context, u, token string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, imdsTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("X-aws-ec2-metadata-token", token)
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, errors.New(resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 64<<10))
}

// Retrieve implements credentials.Provider.
func (m *IMDS) Retrieve() (credentials.Value, error) { return m.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (*IMDS) Describe() string { return "imds (EC2 instance role)" }
