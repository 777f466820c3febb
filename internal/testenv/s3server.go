package testenv

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Server is an S3-compatible server started for one test: MinIO
// (StartMinIO) or the Versity S3 Gateway (StartVersityGW), an independent
// implementation. Tests written against S3Server run against either, so the
// behaviour nixspool relies on is checked on two code bases.
type S3Server interface {
	// Kind names the implementation ("minio", "versitygw").
	Kind() string
	// Addr is the server's 127.0.0.1:PORT.
	Addr() string
	// Credentials are the access and secret key of the server's account.
	Credentials() (access, secret string)
	// CacheURL is the s3:// address of the test bucket with extra query
	// parameters (may be empty).
	CacheURL(params string) string
	// BucketURL is the s3:// address of another bucket on this server.
	BucketURL(bucket, params string) string
	// CacheURLVia is CacheURL("") reached through a fault proxy.
	CacheURLVia(p *FaultProxy) string
	// HTTPURL is the anonymous http:// address stock Nix reads the test
	// bucket from.
	HTTPURL() string
	// Env carries the credentials as agentd gets them (AWS_* variables).
	Env() []string
	// MakeBucket creates another bucket readable anonymously.
	MakeBucket(name string)
	// Client is an authenticated client for inspecting buckets.
	Client() *minio.Client
	// Keys lists every key in the test bucket.
	Keys(t T) []string
	// Stop stops the server; Start starts it again on the same address
	// and data.
	Stop()
	Start()
}

var (
	_ S3Server = (*MinIO)(nil)
	_ S3Server = (*VersityGW)(nil)
)

// S3Kind is an S3 implementation tests can run against.
type S3Kind struct {
	Name  string
	Start func(t T) S3Server
}

// S3Kinds lists every S3 implementation the tests know, MinIO first.
// Parametrised tests run once per kind:
//
//	for _, k := range testenv.S3Kinds() {
//		t.Run(k.Name, func(t *testing.T) { s := k.Start(t); … })
//	}
func S3Kinds() []S3Kind {
	return []S3Kind{
		{Name: "minio", Start: func(t T) S3Server { return StartMinIO(t) }},
		{Name: "versitygw", Start: func(t T) S3Server { return StartVersityGW(t) }},
	}
}

// Kind implements S3Server.
func (m *MinIO) Kind() string { return "minio" }

// Addr implements S3Server.
func (m *MinIO) Addr() string { return m.Endpoint }

// Credentials implements S3Server.
func (m *MinIO) Credentials() (string, string) { return m.AccessKey, m.SecretKey }

// s3Account is what every S3 server started here shares: an address, one
// account and a test bucket that anyone may read.
type s3Account struct {
	Endpoint  string // 127.0.0.1:PORT
	AccessKey string
	SecretKey string
	Bucket    string // created, with anonymous read access
	t         T
}

// Addr implements S3Server.
func (s *s3Account) Addr() string { return s.Endpoint }

// Credentials implements S3Server.
func (s *s3Account) Credentials() (string, string) { return s.AccessKey, s.SecretKey }

// Client implements S3Server.
func (s *s3Account) Client() *minio.Client {
	c, err := minio.New(s.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""), BucketLookup: minio.BucketLookupPath})
	if err != nil {
		s.t.Fatalf("%v", err)
	}
	return c
}

// MakeBucket implements S3Server: the bucket gets a policy that lets
// anyone read its objects, as a public cache bucket has.
func (s *s3Account) MakeBucket(name string) {
	s.t.Helper()
	c := s.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.MakeBucket(ctx, name, minio.MakeBucketOptions{}); err != nil {
		s.t.Fatalf("make bucket: %v", err)
	}
	if err := c.SetBucketPolicy(ctx, name, publicReadPolicy(name)); err != nil {
		s.t.Fatalf("set bucket policy: %v", err)
	}
}

// publicReadPolicy is a bucket policy that lets anyone read objects.
func publicReadPolicy(bucket string) string {
	return fmt.Sprintf(`{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":["*"]},"Action":["s3:GetObject"],"Resource":["arn:aws:s3:::%s/*"]}]}`, bucket)
}

// CacheURL implements S3Server.
func (s *s3Account) CacheURL(params string) string { return s.BucketURL(s.Bucket, params) }

// BucketURL implements S3Server.
func (s *s3Account) BucketURL(bucket, params string) string {
	u := fmt.Sprintf("s3://%s?endpoint=%s&scheme=http&region=us-east-1", bucket, s.Endpoint)
	if params != "" {
		u += "&" + params
	}
	return u
}

// CacheURLVia implements S3Server.
func (s *s3Account) CacheURLVia(p *FaultProxy) string {
	return strings.Replace(s.CacheURL(""), s.Endpoint, p.Endpoint, 1)
}

// HTTPURL implements S3Server.
func (s *s3Account) HTTPURL() string { return "http://" + s.Endpoint + "/" + s.Bucket }

// Env implements S3Server.
func (s *s3Account) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey}
}

// Keys implements S3Server.
func (s *s3Account) Keys(t T) []string {
	t.Helper()
	var keys []string
	for o := range s.Client().ListObjects(context.Background(), s.Bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatalf("%v", o.Err)
		}
		keys = append(keys, o.Key)
	}
	return keys
}
