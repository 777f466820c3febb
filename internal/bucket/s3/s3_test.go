package s3

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/buckettest"
	"github.com/nixspool/nixspool/internal/testenv"
	"golang.org/x/sync/errgroup"
)

func newTestBucket(t *testing.T, m testenv.S3Server, access, secret string) *Bucket {
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

// contractCaps are the optional behaviours each S3 implementation has,
// as the contract suite finds them.
var contractCaps = map[string]buckettest.Caps{
	"minio":     {ContentEncoding: true, PartETagIsMD5: true},
	"versitygw": {ContentEncoding: true, PartETagIsMD5: true, ListUploadsByPrefix: true},
}

func TestContractMinIO(t *testing.T) {
	m := testenv.StartMinIO(t)
	buckettest.RunWith(t, newTestBucket(t, m, m.AccessKey, m.SecretKey), contractCaps["minio"])
}

// forEachS3 runs f against a fresh server of every S3 implementation.
func forEachS3(t *testing.T, f func(t *testing.T, s testenv.S3Server)) {
	for _, k := range testenv.S3Kinds() {
		t.Run(k.Name, func(t *testing.T) { f(t, k.Start(t)) })
	}
}

func TestWrongCredentialsArePermanent(t *testing.T) {
	forEachS3(t, func(t *testing.T, s testenv.S3Server) {
		access, _ := s.Credentials()
		for _, c := range []struct{ access, secret string }{{access, "wrong-secret"}, {"wrong-access", "wrong-secret"}} {
			b := newTestBucket(t, s, c.access, c.secret)
			_, err := b.Put(context.Background(), "x", strings.NewReader("x"), 1, bucket.PutOptions{})
			if !bucket.IsPermanent(err) {
				t.Fatalf("Put with wrong credentials = %v, want a permanent error", err)
			}
			if strings.Contains(err.Error(), "wrong-secret") {
				t.Fatal("error text contains the secret")
			}
			// A HEAD answer has no body to name its error. MinIO names it in
			// a header; elsewhere (AWS S3, versitygw) a 403 is all there is,
			// which a bucket without ListBucket also answers for a missing
			// key: Stat may then say "not there", and the write that
			// follows fails as above. It must never look like an outage,
			// which would be retried for ever.
			_, err = b.Stat(context.Background(), "x.narinfo")
			if s.Kind() == "minio" && (!bucket.IsPermanent(err) || bucket.IsNotExist(err)) {
				t.Fatalf("Stat with wrong credentials = %v, want a permanent error", err)
			}
			if err == nil || errors.Is(err, bucket.ErrUnavailable) {
				t.Fatalf("Stat with wrong credentials = %v, want ErrNotExist or a permanent error", err)
			}
		}
	})
}

func TestMissingBucketIsPermanent(t *testing.T) {
	forEachS3(t, func(t *testing.T, s testenv.S3Server) {
		access, secret := s.Credentials()
		t.Setenv("AWS_ACCESS_KEY_ID", access)
		t.Setenv("AWS_SECRET_ACCESS_KEY", secret)
		c, _ := cacheurl.Parse(s.BucketURL("no-such-bucket", ""))
		b, _ := New(c)
		_, err := b.Put(context.Background(), "x", strings.NewReader("x"), 1, bucket.PutOptions{})
		if !bucket.IsPermanent(err) {
			t.Fatalf("Put to a missing bucket = %v, want a permanent error", err)
		}
		// As above, only MinIO names a HEAD's error (NoSuchBucket); a bare
		// 404 reads as a missing key, and the write says what is wrong.
		_, err = b.Stat(context.Background(), "x.narinfo")
		if s.Kind() == "minio" && !bucket.IsPermanent(err) {
			t.Fatalf("Stat in a missing bucket = %v, want a permanent error", err)
		}
		if err == nil || errors.Is(err, bucket.ErrUnavailable) {
			t.Fatalf("Stat in a missing bucket = %v, want ErrNotExist or a permanent error", err)
		}
	})
}

// TestKeyConflictAltVersityGW: versitygw's posix backend stores objects as
// files, so "a" and "a/b" cannot both exist; the refusal is permanent (a
// retry cannot fix it), not an outage.
func TestKeyConflictAltVersityGW(t *testing.T) {
	b := newTestBucketOn(t, testenv.StartVersityGW(t))
	ctx := context.Background()
	for _, keys := range [][2]string{{"a", "a/b"}, {"c/d", "c"}} {
		if _, err := b.Put(ctx, keys[0], strings.NewReader("x"), 1, bucket.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		_, err := b.Put(ctx, keys[1], strings.NewReader("y"), 1, bucket.PutOptions{})
		if !bucket.IsPermanent(err) {
			t.Fatalf("Put %s after %s = %v, want a permanent error", keys[1], keys[0], err)
		}
	}
}

// TestListManyKeys lists more keys than one ListObjectsV2 answer holds
// (1,000), from the start and after a key on the second page, and deletes
// them in two multi-object deletes.
func TestListManyKeys(t *testing.T) {
	forEachS3(t, func(t *testing.T, s testenv.S3Server) {
		b := newTestBucketOn(t, s)
		ctx := context.Background()
		const n = 1100
		keys := make([]string, n)
		for i := range keys {
			keys[i] = fmt.Sprintf("%04d.narinfo", i)
		}
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(16)
		for _, k := range keys {
			g.Go(func() error {
				_, err := b.Put(gctx, k, strings.NewReader(k), int64(len(k)), bucket.PutOptions{})
				return err
			})
		}
		if err := g.Wait(); err != nil {
			t.Fatal(err)
		}
		list := func(opts bucket.ListOptions) []string {
			var got []string
			if err := b.List(ctx, opts, func(o bucket.Object) error {
				got = append(got, o.Key)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			return got
		}
		if got := list(bucket.ListOptions{}); strings.Join(got, " ") != strings.Join(keys, " ") {
			t.Fatalf("List returned %d keys, want all %d in order", len(got), n)
		}
		if got := list(bucket.ListOptions{StartAfter: keys[1049]}); strings.Join(got, " ") != strings.Join(keys[1050:], " ") {
			t.Fatalf("List after %s = %v", keys[1049], got)
		}
		if err := bucket.DeleteAll(ctx, b, keys); err != nil {
			t.Fatal(err)
		}
		if got := list(bucket.ListOptions{Recursive: true}); len(got) != 0 {
			t.Fatalf("%d keys left after DeleteAll", len(got))
		}
	})
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

// TestContractAltVersityGW runs the contract against the Versity S3
// Gateway, an S3 implementation independent of MinIO.
func TestContractAltVersityGW(t *testing.T) {
	v := testenv.StartVersityGW(t)
	buckettest.RunWith(t, newTestBucketOn(t, v), contractCaps["versitygw"])
}

// newTestBucketOn connects to s's test bucket with its account.
func newTestBucketOn(t *testing.T, s testenv.S3Server) *Bucket {
	t.Helper()
	access, secret := s.Credentials()
	return newTestBucket(t, s, access, secret)
}
