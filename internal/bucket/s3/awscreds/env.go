package awscreds

import (
	"errors"
	"os"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Env reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN.
// It comes first, even when the cache URL names a profile.
type Env struct{ never }

// RetrieveWithCredContext implements credentials.Provider.
func (*Env) RetrieveWithCredContext(*credentials.CredContext) (credentials.Value, error) {
	id, secret := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY")
	switch {
	case id == "" && secret == "":
		return credentials.Value{}, ErrNotConfigured
	case id == "" || secret == "":
		return credentials.Value{}, errors.New("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set")
	}
	return credentials.Value{AccessKeyID: id, SecretAccessKey: secret, SessionToken: os.Getenv("AWS_SESSION_TOKEN"), SignerType: credentials.SignatureV4}, nil
}

// Retrieve implements credentials.Provider.
func (e *Env) Retrieve() (credentials.Value, error) { return e.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (*Env) Describe() string { return "environment (AWS_ACCESS_KEY_ID)" }

// never is the expiry of credentials that do not expire.
type never struct{}

// IsExpired implements credentials.Provider.
func (never) IsExpired() bool { return false }
