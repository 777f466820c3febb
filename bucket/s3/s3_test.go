package s3

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/bucket/buckettest"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/testenv"
)

func newTestBucket(t *testing.T, m *testenv.MinIO, access, secret string) *Bucket {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", secret)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
	c, err := cacheurl.Parse(m.CacheURL(""))
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestContractMinIO(t *testing.T) {
	m := testenv.StartMinIO(t)
	buckettest.Run(t, newTestBucket(t, m, m.AccessKey, m.SecretKey))
}

func TestWrongCredentialsArePermanent(t *testing.T) {
	m := testenv.StartMinIO(t)
	b := newTestBucket(t, m, m.AccessKey, "wrong-secret")
	_, err := b.Put(context.Background(), "x", strings.NewReader("x"), 1, bucket.PutOptions{})
	if !bucket.IsPermanent(err) {
		t.Fatalf("Put with a wrong secret = %v, want a permanent error", err)
	}
	if strings.Contains(err.Error(), "wrong-secret") {
		t.Fatal("error text contains the secret")
	}
}

func TestMissingBucketIsPermanent(t *testing.T) {
	m := testenv.StartMinIO(t)
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	c, _ := cacheurl.Parse(strings.Replace(m.CacheURL(""), m.Bucket, "no-such-bucket", 1))
	b, _ := New(c)
	_, err := b.Put(context.Background(), "x", strings.NewReader("x"), 1, bucket.PutOptions{})
	if !bucket.IsPermanent(err) {
		t.Fatalf("Put to a missing bucket = %v, want a permanent error", err)
	}
}

func TestPartSize(t *testing.T) {
	for _, size := range []int64{-1, 0, 1, 100 << 20, 5 << 40} {
		ps := PartSize(size)
		if ps < MinPartSize {
			t.Errorf("PartSize(%d) = %d, below the minimum", size, ps)
		}
		if size > 0 && (uint64(size)+ps-1)/ps > 10000 {
			t.Errorf("PartSize(%d) = %d needs more than 10,000 parts", size, ps)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"7":                             7 * time.Second,
		"-3":                            0,
		"junk":                          0,
		"99999":                         time.Hour,
		"Thu, 01 Jan 2026 00:00:30 GMT": 30 * time.Second,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}

func TestUnreachableIsUnavailable(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "x")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "y")
	c, _ := cacheurl.Parse(fmt.Sprintf("s3://somebucket?endpoint=127.0.0.1:%d&scheme=http", testenv.FreePort(t)))
	b, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = b.Stat(ctx, "x.narinfo")
	if !errors.Is(err, bucket.ErrUnavailable) || bucket.IsNotExist(err) {
		t.Fatalf("Stat against a closed port = %v, want ErrUnavailable", err)
	}
}
