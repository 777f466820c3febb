// Package buckettest is the contract every bucket.Bucket implementation must
// meet, as one suite run against each of them.
package buckettest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/bucket"
)

func put(t *testing.T, b bucket.Bucket, key, body string, opts bucket.PutOptions) bucket.Info {
	t.Helper()
	info, err := b.Put(context.Background(), key, strings.NewReader(body), int64(len(body)), opts)
	if err != nil {
		t.Fatalf("Put %s: %v", key, err)
	}
	return info
}

// Run runs the contract suite against the bucket b, which must be empty.
func Run(t *testing.T, b bucket.Bucket) {
	ctx := context.Background()
	t.Run("StatMissing", func(t *testing.T) {
		_, err := b.Stat(ctx, "missing.narinfo")
		if !bucket.IsNotExist(err) {
			t.Fatalf("Stat of a missing key = %v, want ErrNotExist", err)
		}
		if _, _, err := b.Get(ctx, "missing.narinfo", 100); !bucket.IsNotExist(err) {
			t.Fatalf("Get of a missing key = %v, want ErrNotExist", err)
		}
		if _, _, err := b.Open(ctx, "missing.narinfo", 0, 10); !bucket.IsNotExist(err) {
			t.Fatalf("Open of a missing key = %v, want ErrNotExist", err)
		}
	})
	t.Run("PutStatGetDelete", func(t *testing.T) {
		data := []byte("StorePath: /nix/store/x\n")
		before := bucket.Now(b).Add(-2 * time.Second)
		pinfo, err := b.Put(ctx, "abc.narinfo", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{ContentType: "text/x-nix-narinfo"})
		if err != nil {
			t.Fatal(err)
		}
		info, err := b.Stat(ctx, "abc.narinfo")
		if err != nil || info.Size != int64(len(data)) || info.ETag == "" {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		if pinfo.ETag != info.ETag {
			t.Fatalf("Put reported ETag %q, Stat %q", pinfo.ETag, info.ETag)
		}
		if after := bucket.Now(b).Add(2 * time.Second); info.LastModified.Before(before) || info.LastModified.After(after) {
			t.Fatalf("LastModified %v not within [%v, %v] by the bucket's clock", info.LastModified, before, after)
		}
		got, ginfo, err := b.Get(ctx, "abc.narinfo", 1000)
		if err != nil || !bytes.Equal(got, data) || ginfo.ETag != info.ETag {
			t.Fatalf("Get = %q, %+v, %v", got, ginfo, err)
		}
		if _, _, err := b.Get(ctx, "abc.narinfo", 3); err == nil {
			t.Fatal("Get with a small max accepted a larger object")
		}
		rc, oinfo, err := b.Open(ctx, "abc.narinfo", 7, 5)
		if err != nil {
			t.Fatal(err)
		}
		if oinfo.Size != int64(len(data)) || oinfo.ETag != info.ETag {
			t.Fatalf("Open(7, 5) info = %+v, want the whole object's size %d and ETag", oinfo, len(data))
		}
		part, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || string(part) != string(data[7:12]) {
			t.Fatalf("Open(7, 5) read %q, %v; want %q", part, err, data[7:12])
		}
		rc, _, err = b.Open(ctx, "abc.narinfo", 11, -1)
		if err != nil {
			t.Fatal(err)
		}
		part, _ = io.ReadAll(rc)
		rc.Close()
		if string(part) != string(data[11:]) {
			t.Fatalf("Open(11, -1) read %q", part)
		}
		// Overwrite with the same content is harmless.
		if _, err := b.Put(ctx, "abc.narinfo", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{}); err != nil {
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
		if _, err := b.Put(ctx, "nar/big.nar.zst", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{ContentType: "application/x-nix-nar"}); err != nil {
			t.Fatal(err)
		}
		info, err := b.Stat(ctx, "nar/big.nar.zst")
		if err != nil || info.Size != int64(len(data)) {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		got, _, err := b.Get(ctx, "nar/big.nar.zst", int64(len(data)))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Get returned %d bytes, %v", len(got), err)
		}
		if err := b.Delete(ctx, "nar/big.nar.zst"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("ShortReaderFailsAndLeavesNothing", func(t *testing.T) {
		r := io.LimitReader(strings.NewReader(strings.Repeat("x", 100)), 60)
		if _, err := b.Put(ctx, "short.narinfo", r, 100, bucket.PutOptions{}); err == nil {
			t.Fatal("Put of a truncated body succeeded")
		}
		if _, err := b.Stat(ctx, "short.narinfo"); !bucket.IsNotExist(err) {
			t.Fatalf("a truncated Put left an object behind: %v", err)
		}
	})
	t.Run("FailingReaderLeavesNothingAndIsLocal", func(t *testing.T) {
		for _, size := range []int64{1000, 3 << 20} { // small and large bodies
			r := io.MultiReader(strings.NewReader("partial"), errReader{})
			_, err := b.Put(ctx, "nar/fail.nar", r, size, bucket.PutOptions{})
			if err == nil {
				t.Fatal("Put with a failing reader succeeded")
			}
			if errors.Is(err, bucket.ErrUnavailable) {
				t.Fatalf("a local read error was blamed on the bucket: %v", err)
			}
			if _, err := b.Stat(ctx, "nar/fail.nar"); !bucket.IsNotExist(err) {
				t.Fatalf("a failed Put left an object behind: %v", err)
			}
		}
	})
	t.Run("CancelledContext", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := b.Put(cctx, "cancelled", strings.NewReader("x"), 1, bucket.PutOptions{}); err == nil {
			t.Fatal("Put with a cancelled context succeeded")
		}
	})
	t.Run("ConditionalWrites", func(t *testing.T) {
		first := put(t, b, "cond.narinfo", "first\n", bucket.PutOptions{IfNoneMatch: true})
		_, err := b.Put(ctx, "cond.narinfo", strings.NewReader("second\n"), 7, bucket.PutOptions{IfNoneMatch: true})
		if !bucket.IsPrecondition(err) {
			t.Fatalf("create-only Put over an existing key = %v, want ErrPrecondition", err)
		}
		if got, _, _ := b.Get(ctx, "cond.narinfo", 100); string(got) != "first\n" {
			t.Fatalf("a refused create-only Put changed the object to %q", got)
		}
		second := put(t, b, "cond.narinfo", "second\n", bucket.PutOptions{IfMatch: first.ETag})
		if second.ETag == first.ETag {
			t.Fatal("a rewrite kept the ETag")
		}
		if _, err := b.Put(ctx, "cond.narinfo", strings.NewReader("third\n"), 6, bucket.PutOptions{IfMatch: first.ETag}); !bucket.IsPrecondition(err) {
			t.Fatalf("Put with a stale IfMatch = %v, want ErrPrecondition", err)
		}
		if got, _, _ := b.Get(ctx, "cond.narinfo", 100); string(got) != "second\n" {
			t.Fatalf("object is %q after a refused IfMatch Put", got)
		}
		ok, err := bucket.ProbeConditional(ctx, b, "nixspool/probe/")
		if err != nil || !ok {
			t.Fatalf("ProbeConditional = %v, %v; want true", ok, err)
		}
		b.Delete(ctx, "cond.narinfo")
	})
	t.Run("List", func(t *testing.T) {
		keys := []string{"0a.narinfo", "0b.ls", "1c.narinfo", "nar/0a.nar.zst", "nar/1c.nar", "nix-cache-info", "log/x.drv"}
		for _, k := range keys {
			put(t, b, k, "body of "+k, bucket.PutOptions{})
		}
		defer bucket.DeleteAll(ctx, b, keys)
		list := func(opts bucket.ListOptions) []string {
			var got []string
			err := b.List(ctx, opts, func(o bucket.Object) error {
				if o.Size != int64(len("body of "+o.Key)) || o.ETag == "" || o.LastModified.IsZero() {
					t.Errorf("listed %+v", o)
				}
				got = append(got, o.Key)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			return got
		}
		cases := []struct {
			opts bucket.ListOptions
			want []string
		}{
			{bucket.ListOptions{Recursive: true}, keys},
			{bucket.ListOptions{}, []string{"0a.narinfo", "0b.ls", "1c.narinfo", "nix-cache-info"}},
			{bucket.ListOptions{Prefix: "0"}, []string{"0a.narinfo", "0b.ls"}},
			{bucket.ListOptions{Prefix: "n"}, []string{"nix-cache-info"}},
			{bucket.ListOptions{Prefix: "nar/", Recursive: true}, []string{"nar/0a.nar.zst", "nar/1c.nar"}},
			{bucket.ListOptions{Prefix: "nar/1"}, []string{"nar/1c.nar"}},
			{bucket.ListOptions{StartAfter: "0b.ls"}, []string{"1c.narinfo", "nix-cache-info"}},
		}
		for _, c := range cases {
			want := append([]string(nil), c.want...)
			sort.Strings(want)
			if got := list(c.opts); strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("List(%+v) = %v, want %v", c.opts, got, want)
			}
		}
		stop := errors.New("stop")
		n := 0
		if err := b.List(ctx, bucket.ListOptions{Recursive: true}, func(bucket.Object) error { n++; return stop }); err != stop || n != 1 {
			t.Errorf("List did not stop at fn's error: %v after %d", err, n)
		}
		if err := bucket.DeleteAll(ctx, b, keys); err != nil {
			t.Fatal(err)
		}
		if got := list(bucket.ListOptions{Recursive: true}); len(got) != 0 {
			t.Fatalf("after DeleteAll: %v", got)
		}
	})
	if mp, ok := b.(bucket.Multipart); ok {
		t.Run("MultipartListUploads", func(t *testing.T) {
			id, err := mp.StartMultipart(ctx, "nar/pending.nar", bucket.PutOptions{})
			if err != nil {
				t.Fatal(err)
			}
			// The exact key: MinIO lists uploads of one key only (and
			// expires stale ones itself).
			ups, err := mp.ListUploads(ctx, "nar/pending.nar")
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, u := range ups {
				found = found || (u.Key == "nar/pending.nar" && u.UploadID == id && !u.Initiated.IsZero())
			}
			if !found {
				t.Fatalf("ListUploads = %+v, want nar/pending.nar %s", ups, id)
			}
			if err := mp.AbortMultipart(ctx, "nar/pending.nar", id); err != nil {
				t.Fatal(err)
			}
		})
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("disk read error") }
