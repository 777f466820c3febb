package cachegc

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
)

// noListing is a store that cannot list and says so, as an HTTP binary
// cache does; any request other than List goes to the directory below.
type noListing struct {
	bucket.Bucket
	t *testing.T
}

func (b noListing) NoListing() error {
	return bucket.NoListingError("http://cache.test", "an HTTP binary cache has no listing request")
}

func (b noListing) List(context.Context, bucket.ListOptions, func(bucket.Object) error) error {
	b.t.Errorf("List called on a store that cannot list")
	return b.NoListing()
}

// TestRefusedWithoutListing: a cycle and the pins listing refuse at once,
// in one line naming why, on a store that cannot list, and write nothing.
func TestRefusedWithoutListing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cache")
	fb, err := filebucket.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	b := noListing{fb, t}
	_, err = Run(context.Background(), b, Options{KeepSince: time.Hour, Grace: time.Hour})
	if !errors.Is(err, bucket.ErrNoListing) || !strings.Contains(err.Error(), "http://cache.test cannot be listed (an HTTP binary cache has no listing request)") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Run = %v, want a one-line refusal naming why", err)
	}
	if _, err := ListPins(context.Background(), b); !errors.Is(err, bucket.ErrNoListing) {
		t.Fatalf("ListPins = %v, want ErrNoListing", err)
	}
	n := 0
	fb.List(context.Background(), bucket.ListOptions{Recursive: true}, func(bucket.Object) error { n++; return nil })
	if n != 0 {
		t.Fatalf("a refused cycle wrote %d objects", n)
	}
}
