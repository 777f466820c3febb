// Package buckettest is the contract every bucket.Bucket implementation must
// meet, as one suite run against each of them.
package buckettest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/bucket"
)

// Run runs the contract suite against the bucket b, which must be empty.
func Run(t *testing.T, b bucket.Bucket) {
	ctx := context.Background()
	t.Run("StatMissing", func(t *testing.T) {
		_, err := b.Stat(ctx, "missing.narinfo")
		if !bucket.IsNotExist(err) {
			t.Fatalf("Stat of a missing key = %v, want ErrNotExist", err)
		}
		if _, err := b.Get(ctx, "missing.narinfo", 100); !bucket.IsNotExist(err) {
			t.Fatalf("Get of a missing key = %v, want ErrNotExist", err)
		}
	})
	t.Run("PutStatGetDelete", func(t *testing.T) {
		data := []byte("StorePath: /nix/store/x\n")
		if err := b.Put(ctx, "abc.narinfo", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{ContentType: "text/x-nix-narinfo"}); err != nil {
			t.Fatal(err)
		}
		info, err := b.Stat(ctx, "abc.narinfo")
		if err != nil || info.Size != int64(len(data)) {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		got, err := b.Get(ctx, "abc.narinfo", 1000)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Get = %q, %v", got, err)
		}
		if _, err := b.Get(ctx, "abc.narinfo", 3); err == nil {
			t.Fatal("Get with a small max accepted a larger object")
		}
		// Overwrite with the same content is harmless.
		if err := b.Put(ctx, "abc.narinfo", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := b.Delete(ctx, "abc.narinfo"); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Stat(ctx, "abc.narinfo"); !bucket.IsNotExist(err) {
			t.Fatalf("Stat after Delete = %v", err)
		}
		if err := b.Delete(ctx, "abc.narinfo"); err != nil {
			t.Fatalf("Delete of a missing key = %v", err)
		}
	})
	t.Run("NestedKeyAndLargeObject", func(t *testing.T) {
		data := make([]byte, 20<<20+12345) // above the multipart threshold
		rand.Read(data)
		if err := b.Put(ctx, "nar/big.nar.zst", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{ContentType: "application/x-nix-nar"}); err != nil {
			t.Fatal(err)
		}
		info, err := b.Stat(ctx, "nar/big.nar.zst")
		if err != nil || info.Size != int64(len(data)) {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		got, err := b.Get(ctx, "nar/big.nar.zst", int64(len(data)))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Get returned %d bytes, %v", len(got), err)
		}
	})
	t.Run("ShortReaderFailsAndLeavesNothing", func(t *testing.T) {
		r := io.LimitReader(strings.NewReader(strings.Repeat("x", 100)), 60)
		if err := b.Put(ctx, "short.narinfo", r, 100, bucket.PutOptions{}); err == nil {
			t.Fatal("Put of a truncated body succeeded")
		}
		if _, err := b.Stat(ctx, "short.narinfo"); !bucket.IsNotExist(err) {
			t.Fatalf("a truncated Put left an object behind: %v", err)
		}
	})
	t.Run("FailingReaderLeavesNothing", func(t *testing.T) {
		r := io.MultiReader(strings.NewReader("partial"), errReader{})
		if err := b.Put(ctx, "nar/fail.nar", r, 1000, bucket.PutOptions{}); err == nil {
			t.Fatal("Put with a failing reader succeeded")
		}
		if _, err := b.Stat(ctx, "nar/fail.nar"); !bucket.IsNotExist(err) {
			t.Fatalf("a failed Put left an object behind: %v", err)
		}
	})
	t.Run("CancelledContext", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := b.Put(cctx, "cancelled", strings.NewReader("x"), 1, bucket.PutOptions{}); err == nil {
			t.Fatal("Put with a cancelled context succeeded")
		}
	})
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("disk read error") }
