// Package awscreds finds S3 credentials the way Nix (2.33.4, 2.34.2, 2.35
// and later) does, in its order: the environment, SSO, the profile in the
// shared config and credentials files (static keys, role_arn through STS
// AssumeRole, credential_process), STS web identity, ECS container
// credentials, and EC2 instance metadata (IMDS, skipped when the ECS
// variables are set). Each link names where its credentials come from,
// never a secret, so that operators can be told.
package awscreds

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// ErrNotConfigured is what a link returns when nothing asks for it (its
// variables or profile keys are absent); the chain then tries the next
// link without counting it as a failure.
var ErrNotConfigured = errors.New("not configured")

// Link is one provider of the chain.
type Link interface {
	credentials.Provider
	// Describe names where the credentials come from (never a secret).
	Describe() string
}

// Options say what the cache URL adds to the chain.
type Options struct {
	Profile string // profile= of the cache URL; empty: AWS_PROFILE, then "default"
	Region  string // region= of the cache URL (web identity's last resort)
}

// NewChain returns the chain in Nix's order for the cache URL's options.
func NewChain(o Options) *Chain {
	return &Chain{Links: []Link{
		&Env{},
		&SSO{Profile: o.Profile},
		&Profile{Name: o.Profile},
		&WebIdentity{URLRegion: o.Region},
		&ECS{},
		&IMDS{},
	}}
}

// Chain tries its links in order and keeps the first that gives
// credentials until they expire; with none it gives anonymous credentials,
// as Nix then sends unsigned requests.
type Chain struct {
	Links []Link

	mu        sync.Mutex
	curr      Link
	anonUntil time.Time // with no credentials, when to look again
	source    string    // what supplied the current credentials, for Describe
	had       bool      // a link gave credentials once
}

func (c *Chain) hadCredentials() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.had
}

// anonymousFor is how long the chain keeps sending unsigned requests
// before it looks for credentials again.
const anonymousFor = time.Minute

// RetrieveWithCredContext implements credentials.Provider.
func (c *Chain) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	var failed []string
	for _, l := range c.Links {
		v, err := l.RetrieveWithCredContext(cc)
		if errors.Is(err, ErrNotConfigured) {
			continue
		}
		if err == nil && (v.AccessKeyID == "" || v.SecretAccessKey == "") {
			err = errors.New("gave an empty access key or secret")
		}
		if err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", l.Describe(), err))
			continue
		}
		c.set(l, l.Describe())
		return v, nil
	}
	if len(failed) > 0 && c.hadCredentials() {
		// Credentials were found before and their renewal failed (an STS
		// endpoint down while a session renews, say): an error the
		// request reports and the job retries. Unsigned requests would
		// be refused as forbidden, a permanent failure, or read as "not
		// there".
		err := fmt.Errorf("no credentials: %s", strings.Join(failed, "; "))
		c.setFailed("none: " + err.Error())
		return credentials.Value{}, err
	}
	what := "none: requests are sent unsigned"
	if len(failed) > 0 {
		what += " (" + strings.Join(failed, "; ") + ")"
	}
	c.set(nil, what)
	return credentials.Value{SignerType: credentials.SignatureAnonymous}, nil
}

// setFailed records that configured sources failed: nothing is current,
// and the next request asks again.
func (c *Chain) setFailed(source string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.curr, c.source, c.anonUntil = nil, source, time.Time{}
}

func (c *Chain) set(l Link, source string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.curr, c.source = l, source
	c.anonUntil = time.Time{}
	c.had = c.had || l != nil
	if l == nil {
		c.anonUntil = time.Now().Add(anonymousFor)
	}
}

// Retrieve implements credentials.Provider.
func (c *Chain) Retrieve() (credentials.Value, error) { return c.RetrieveWithCredContext(nil) }

// IsExpired implements credentials.Provider: the current link's
// credentials are about to expire, or there are none yet. Without
// credentials they are looked for again after a minute (a credentials file
// or a role may appear later), not on every request.
func (c *Chain) IsExpired() bool {
	c.mu.Lock()
	l, anonUntil := c.curr, c.anonUntil
	c.mu.Unlock()
	if l == nil {
		return !time.Now().Before(anonUntil)
	}
	return l.IsExpired()
}

// Describe says which link supplied the credentials last retrieved, or
// why there are none; empty before the first retrieval.
func (c *Chain) Describe() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.source
}

// requestContext is the caller's context and HTTP client from cc, with
// defaults for a nil cc (the deprecated Retrieve).
func requestContext(cc *credentials.CredContext) context.Context {
	if cc == nil || cc.Context == nil {
		return context.Background()
	}
	return cc.Context
}

// httpClient is the client for credential endpoints: never the S3
// client's (which may present the cache's TLS client certificate).
var httpClient = &http.Client{Timeout: 30 * time.Second}

// expiry sets e from a credential's expiration: a zero time never expires;
// otherwise refresh once 80% of the remaining lifetime has passed (a
// 15-minute session is renewed after 12 minutes), so that a long upload
// signs every request with credentials that are still valid.
func expiry(e *credentials.Expiry, at time.Time) {
	if at.IsZero() {
		e.SetExpiration(time.Now().AddDate(100, 0, 0), 0)
		return
	}
	e.SetExpiration(at, credentials.DefaultExpiryWindow)
}
