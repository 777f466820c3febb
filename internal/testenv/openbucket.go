package testenv

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
)

// MakeOpenBucket creates a bucket that anyone may read and write without
// credentials (anonymous s3:GetObject and s3:PutObject), so that stock Nix,
// which has no S3 support in the version the tests run, can upload to it as
// an http:// binary cache:
//
//	nix copy --to 'http://127.0.0.1:PORT/BUCKET?compression=zstd&secret-key=FILE' PATH…
//
// Only for tests: such a bucket is writable by anyone who can reach it.
func (m *MinIO) MakeOpenBucket(name string) {
	m.t.Helper()
	c := m.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.MakeBucket(ctx, name, minio.MakeBucketOptions{}); err != nil {
		m.t.Fatalf("make bucket %s: %v", name, err)
	}
	policy := fmt.Sprintf(`{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":["*"]},"Action":["s3:GetObject","s3:PutObject"],"Resource":["arn:aws:s3:::%s/*"]}]}`, name)
	if err := c.SetBucketPolicy(ctx, name, policy); err != nil {
		m.t.Fatalf("set bucket policy of %s: %v", name, err)
	}
}

// BucketHTTPURL is the http:// address of a bucket on this server as
// reached at endpoint (m.Endpoint, or a proxy's): what stock Nix reads from
// (and, for an open bucket, writes to).
func (m *MinIO) BucketHTTPURL(endpoint, bucket string) string {
	return "http://" + endpoint + "/" + bucket
}

// BucketURLVia is the s3:// address of a bucket on this server reached at
// endpoint (a proxy in front of the server) instead of the server itself.
func (m *MinIO) BucketURLVia(endpoint, bucket, params string) string {
	return strings.Replace(m.BucketURL(bucket, params), "endpoint="+m.Endpoint, "endpoint="+endpoint, 1)
}
