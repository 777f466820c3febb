package limit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/s3"
	"github.com/nixspool/nixspool/internal/testenv"
)

// TestPacerChargesASinglePutOnce: a single-request PUT of a large body (a
// NAR of a few MiB, under a part) puts its bytes on the link once, so the
// pacer must charge them once. minio-go reads such a body twice when it
// lacks the body's SHA-256 (Content-MD5 first, then the send): the first
// read must not cost the rate.
func TestPacerChargesASinglePutOnce(t *testing.T) {
	m := testenv.StartMinIO(t)
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
	c, err := cacheurl.Parse(m.CacheURL(""))
	if err != nil {
		t.Fatal(err)
	}
	inner, err := s3.New(c)
	if err != nil {
		t.Fatal(err)
	}
	// A clock that stands still: after the first adjustment the rate and
	// the count of bytes taken stay as they are, whatever the probes see.
	now := time.Unix(1e9, 0)
	p := NewPacer(PaceOptions{Initial: 1 << 30, NearBase: time.Nanosecond, Now: func() time.Time { return now }})
	p.Observe(time.Millisecond) // the adjustment, before any body
	b := Wrap(inner, New(Options{Pacer: p}))

	// 1 MiB: the S3 client's in-memory path; 4 MiB: above largeBody,
	// below a part, one PUT. With the caller's SHA-256 (as the uploader
	// gives for NARs) and without (the pacer's bucket hashes the file).
	for _, size := range []int64{1 << 20, 4 << 20} {
		for _, withSum := range []bool{true, false} {
			body := bytes.Repeat([]byte("n"), int(size))
			f, err := os.Create(filepath.Join(t.TempDir(), "nar"))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.Write(body); err != nil {
				t.Fatal(err)
			}
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				t.Fatal(err)
			}
			var opts bucket.PutOptions
			if withSum {
				sum := sha256.Sum256(body)
				opts.SHA256 = sum[:]
			}
			p.mu.Lock()
			p.read = 0
			p.mu.Unlock()
			key := fmt.Sprintf("nar/%d-%v.nar", size, withSum)
			if _, err := b.Put(context.Background(), key, f, size, opts); err != nil {
				t.Fatal(err)
			}
			f.Close()
			p.mu.Lock()
			charged := p.read
			p.mu.Unlock()
			if charged != size {
				t.Errorf("%s: the pacer charged %d bytes for a PUT of %d", key, charged, size)
			}
			if got, _, err := inner.Get(context.Background(), key, size+1); err != nil || !bytes.Equal(got, body) {
				t.Errorf("%s: read back %d bytes, %v", key, len(got), err)
			}
		}
	}
}
