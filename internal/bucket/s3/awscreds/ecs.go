package awscreds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// ecsHost is where AWS_CONTAINER_CREDENTIALS_RELATIVE_URI points.
const ecsHost = "http://169.254.170.2"

// ECS gives the credentials of an ECS task or EKS Pod Identity from the
// container credentials endpoint: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI
// or AWS_CONTAINER_CREDENTIALS_FULL_URI, with the authorization token of
// AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (read at each renewal) or
// AWS_CONTAINER_AUTHORIZATION_TOKEN.
type ECS struct {
	credentials.Expiry
	Host string // for the relative URI; empty: 169.254.170.2
}

// ecsConfigured says whether the container credential variables are set;
// then IMDS is not tried, as in Nix, so that a passing failure of the
// container endpoint never falls through to the instance's (usually
// broader) role.
func ecsConfigured() bool {
	return os.Getenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") != "" || os.Getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI") != ""
}

// RetrieveWithCredContext implements credentials.Provider.
func (e *ECS) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	var u string
	if rel := os.Getenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"); rel != "" {
		u = firstSet(e.Host, ecsHost) + rel
	} else if full := os.Getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI"); full != "" {
		if err := allowedFullURI(full); err != nil {
			return credentials.Value{}, err
		}
		u = full
	} else {
		return credentials.Value{}, ErrNotConfigured
	}
	token := os.Getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN")
	if f := os.Getenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return credentials.Value{}, fmt.Errorf("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	ctx, cancel := context.WithTimeout(requestContext(cc), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return credentials.Value{}, err
	}
	if token != "" {
		req.Header.Set("Authorization", token)
	}
	v, err := getRoleCredentials(req)
	if err != nil {
		return credentials.Value{}, fmt.Errorf("container credentials endpoint: %w", err)
	}
	expiry(&e.Expiry, v.Expiration)
	return v, nil
}

// allowedFullURI accepts what the AWS SDKs accept: https, or http to a
// loopback address or the ECS/EKS link-local endpoints.
func allowedFullURI(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("AWS_CONTAINER_CREDENTIALS_FULL_URI: %w", err)
	}
	if u.Scheme == "https" {
		return nil
	}
	h := u.Hostname()
	if u.Scheme == "http" {
		if h == "localhost" || h == "169.254.170.2" || h == "169.254.170.23" || h == "fd00:ec2::23" {
			return nil
		}
		if ip := net.ParseIP(h); ip != nil && ip.IsLoopback() {
			return nil
		}
	}
	return fmt.Errorf("AWS_CONTAINER_CREDENTIALS_FULL_URI: %s is neither https nor a loopback or ECS/EKS address", u.Redacted())
}

// Retrieve implements credentials.Provider.
func (e *ECS) Retrieve() (credentials.Value, error) { return e.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (*ECS) Describe() string { return "ecs (container credentials)" }

// roleCredentials is the JSON of the ECS and IMDS credential endpoints.
type roleCredentials struct {
	Code            string
	Message         string
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string
	Token           string
	Expiration      time.Time
}

// getRoleCredentials makes req and decodes the credentials it answers.
func getRoleCredentials(req *http.Request) (credentials.Value, error) {
	resp, err := httpClient.Do(req)
	if err != nil {
		return credentials.Value{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return credentials.Value{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return credentials.Value{}, errors.New(resp.Status)
	}
	var rc roleCredentials
	if err := json.Unmarshal(body, &rc); err != nil {
		return credentials.Value{}, fmt.Errorf("answer is not the expected JSON: %w", scrubJSONError(err))
	}
	if rc.Code != "" && rc.Code != "Success" {
		return credentials.Value{}, fmt.Errorf("%s: %s", rc.Code, rc.Message)
	}
	return credentials.Value{AccessKeyID: rc.AccessKeyID, SecretAccessKey: rc.SecretAccessKey, SessionToken: rc.Token,
		Expiration: rc.Expiration, SignerType: credentials.SignatureV4}, nil
}
