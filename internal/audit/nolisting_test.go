package audit

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
)

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

// TestRefusedWithoutListing: the whole-cache audit refuses a store that
// cannot list, in one line naming why and what to audit instead.
func TestRefusedWithoutListing(t *testing.T) {
	fb, err := filebucket.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(context.Background(), noListing{fb, t}, Options{})
	if !errors.Is(err, bucket.ErrNoListing) || !strings.Contains(err.Error(), "cannot be listed (an HTTP binary cache has no listing request)") ||
		!strings.Contains(err.Error(), "file://") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Run = %v, want a one-line refusal naming why and what to audit instead", err)
	}
}
