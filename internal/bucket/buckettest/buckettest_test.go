package buckettest

import (
	"context"
	"io"
	"path/filepath"
	"testing"

	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/file"
)

// ignoresConditions is a store that drops If-None-Match and If-Match, as
// some S3 implementations do, and overwrites.
type ignoresConditions struct{ bucket.Bucket }

func (b ignoresConditions) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	opts.IfNoneMatch, opts.IfMatch = false, ""
	return b.Bucket.Put(ctx, key, r, size, opts)
}

// TestStoreIgnoringConditions: the suite accepts a store that ignores
// conditional writes when told so, because ProbeConditional finds out and
// reports false without an error (callers then look before they write).
func TestStoreIgnoringConditions(t *testing.T) {
	fb, err := file.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	b := ignoresConditions{fb}
	if ok, err := bucket.ProbeConditional(context.Background(), b, "probe/"); ok || err != nil {
		t.Fatalf("ProbeConditional = %v, %v on a store that ignores conditions; want false, nil", ok, err)
	}
	RunWith(t, b, Caps{IgnoresConditions: true})
}
