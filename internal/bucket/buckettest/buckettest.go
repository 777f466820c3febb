// Package buckettest is the contract every bucket.Bucket implementation must
// meet, as one suite run against each of them: a local directory, MinIO and
// a second, independent S3 implementation (the Versity S3 Gateway), and
// HTTP binary caches (nginx's DAV module, and an in-memory server that
// honours conditional PUTs).
//
// S3 implementations differ in a few things nixspool can live with either
// way; Caps names them, so the suite checks that a store does what it
// claims and, where it does not, that nixspool's fallback holds.
package buckettest

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

func put(t *testing.T, b bucket.Bucket, key, body string, opts bucket.PutOptions) bucket.Info {
	t.Helper()
	info, err := b.Put(context.Background(), key, strings.NewReader(body), int64(len(body)), opts)
	if err != nil {
		t.Fatalf("Put %s: %v", key, err)
	}
	return info
}

// Caps are the optional behaviours of a store. The zero value is the
// contract every store meets; a field set to true claims (or, for
// IgnoresConditions, admits) a difference, which the suite then checks.
type Caps struct {
	// IgnoresConditions: the store ignores If-None-Match and If-Match and
	// overwrites (older S3 implementations). ProbeConditional must then
	// report false, without an error, so callers know to look before they
	// write.
	IgnoresConditions bool
	// ContentEncoding: the store keeps an object's Content-Encoding and
	// reports it (S3 stores do; a plain directory does not, which is why
	// file:// caches refuse metadata compression).
	ContentEncoding bool
	// ListUploadsByPrefix: ListUploads finds the uploads under a key
	// prefix ("nar/"), as AWS S3 and versitygw do. MinIO lists the uploads
	// of one exact key only (it expires stale uploads itself), so stale
	// upload cleanup finds nothing there, harmlessly.
	ListUploadsByPrefix bool
	// NoListing: the store cannot list its keys (an HTTP binary cache).
	// List must then fail with bucket.ErrNoListing and ErrPermanent, and
	// bucket.CheckListable must say so before anything is asked.
	NoListing bool
	// PartETagIsMD5: a multipart part's ETag is the hex MD5 of its bytes.
	// A resumed upload keeps the parts already on the server only when
	// their ETag matches the local part's MD5; elsewhere it sends them
	// again, which is slower but correct.
	PartETagIsMD5 bool
}

// Run runs the contract suite against the bucket b, which must be empty,
// for a store without any optional behaviour.
func Run(t *testing.T, b bucket.Bucket) { RunWith(t, b, Caps{}) }

// RunWith runs the contract suite against the bucket b, which must be
// empty, checking the optional behaviours caps claims.
func RunWith(t *testing.T, b bucket.Bucket, caps Caps) {
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
		if err != nil || info.Size != int64(len(data)) || info.ETag == "" || info.ContentEncoding != "" {
			t.Fatalf("Stat = %+v, %v; want no Content-Encoding", info, err)
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
		// Above the small-object limit (one PUT request) and above the
		// multipart threshold.
		for _, size := range []int{2<<20 + 1, 20<<20 + 12345} {
			data := make([]byte, size)
			rand.Read(data)
			if _, err := b.Put(ctx, "nar/big.nar.zst", bytes.NewReader(data), int64(len(data)), bucket.PutOptions{ContentType: "application/x-nix-nar"}); err != nil {
				t.Fatal(err)
			}
			info, err := b.Stat(ctx, "nar/big.nar.zst")
			if err != nil || info.Size != int64(len(data)) || info.ContentEncoding != "" {
				t.Fatalf("Stat = %+v, %v; want %d bytes, no Content-Encoding", info, err, size)
			}
			got, _, err := b.Get(ctx, "nar/big.nar.zst", int64(len(data)))
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("Get returned %d bytes, %v", len(got), err)
			}
			if err := b.Delete(ctx, "nar/big.nar.zst"); err != nil {
				t.Fatal(err)
			}
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
	if caps.IgnoresConditions {
		t.Run("ConditionsIgnored", func(t *testing.T) {
			put(t, b, "cond.narinfo", "first\n", bucket.PutOptions{IfNoneMatch: true})
			put(t, b, "cond.narinfo", "second\n", bucket.PutOptions{IfNoneMatch: true})
			ok, err := bucket.ProbeConditional(ctx, b, "nixspool/probe/")
			if err != nil || ok {
				t.Fatalf("ProbeConditional = %v, %v on a store that ignores conditions; want false, nil", ok, err)
			}
			if err := bucket.ProbeIfMatch(ctx, b, "nixspool/probe/"); !errors.Is(err, bucket.ErrIfMatchIgnored) {
				t.Fatalf("ProbeIfMatch = %v on a store that ignores conditions; want ErrIfMatchIgnored", err)
			}
			b.Delete(ctx, "cond.narinfo")
		})
	}
	if !caps.IgnoresConditions {
		t.Run("ConditionalWrites", func(t *testing.T) { conditionalWrites(t, b) })
	}
	if caps.NoListing {
		t.Run("NoListing", func(t *testing.T) {
			err := bucket.CheckListable(b)
			if !errors.Is(err, bucket.ErrNoListing) || !bucket.IsPermanent(err) {
				t.Fatalf("CheckListable = %v, want ErrNoListing and ErrPermanent", err)
			}
			called := false
			err = b.List(ctx, bucket.ListOptions{Recursive: true}, func(bucket.Object) error { called = true; return nil })
			if !errors.Is(err, bucket.ErrNoListing) || !bucket.IsPermanent(err) || called {
				t.Fatalf("List = %v (fn called: %v), want ErrNoListing and ErrPermanent", err, called)
			}
		})
	} else if err := bucket.CheckListable(b); err != nil {
		t.Fatalf("CheckListable = %v on a store that lists", err)
	}
	t.Run("List", func(t *testing.T) {
		if caps.NoListing {
			t.Skip("the store cannot list")
		}
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
	t.Run("KeyCharacters", func(t *testing.T) {
		// Store path names may hold + = ? . _ - beside letters and digits;
		// build logs are stored under the derivation's name.
		keys := []string{"log/0c6a-gtk+-3.24=x?y_z.drv", "0c6b+=?_.narinfo"}
		for _, k := range keys {
			put(t, b, k, "body of "+k, bucket.PutOptions{})
			if info, err := b.Stat(ctx, k); err != nil || info.Size != int64(len("body of "+k)) {
				t.Fatalf("Stat %q = %+v, %v", k, info, err)
			}
			if got, _, err := b.Get(ctx, k, 1000); err != nil || string(got) != "body of "+k {
				t.Fatalf("Get %q = %q, %v", k, got, err)
			}
		}
		if !caps.NoListing {
			var listed []string
			if err := b.List(ctx, bucket.ListOptions{Recursive: true}, func(o bucket.Object) error {
				listed = append(listed, o.Key)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			want := append([]string(nil), keys...)
			sort.Strings(want)
			if strings.Join(listed, " ") != strings.Join(want, " ") {
				t.Fatalf("List = %q, want %q", listed, want)
			}
		}
		if err := bucket.DeleteAll(ctx, b, keys); err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			if _, err := b.Stat(ctx, k); !bucket.IsNotExist(err) {
				t.Fatalf("Stat %q after delete = %v", k, err)
			}
		}
	})
	if caps.ContentEncoding {
		t.Run("ContentEncoding", func(t *testing.T) {
			// Exactly what was set: a store must not keep the aws-chunked
			// framing of the request (stock Nix cannot decode it).
			for _, size := range []int{16, 2<<20 + 1} { // one small and one larger PUT
				data := make([]byte, size)
				rand.Read(data)
				if _, err := b.Put(ctx, "log/enc.drv", bytes.NewReader(data), int64(size), bucket.PutOptions{ContentType: "text/plain", ContentEncoding: "zstd"}); err != nil {
					t.Fatal(err)
				}
				if info, err := b.Stat(ctx, "log/enc.drv"); err != nil || info.ContentEncoding != "zstd" {
					t.Fatalf("Stat = %+v, %v; want Content-Encoding zstd", info, err)
				}
				got, info, err := b.Get(ctx, "log/enc.drv", int64(size))
				if err != nil || info.ContentEncoding != "zstd" || !bytes.Equal(got, data) {
					t.Fatalf("Get = %d bytes, %+v, %v; want the %d bytes as stored, with Content-Encoding zstd", len(got), info, err, size)
				}
			}
			b.Delete(ctx, "log/enc.drv")
		})
	}
	if mp, ok := b.(bucket.Multipart); ok {
		t.Run("Multipart", func(t *testing.T) { multipart(t, b, mp, caps) })
	}
}

// multipart checks what resumable uploads rely on: parts survive on the
// server and are listed with their sizes and ETags, a damaged part is
// refused, the object appears only when completed, and a finished or
// aborted upload is reported as gone.
func multipart(t *testing.T, b bucket.Bucket, mp bucket.Multipart, caps Caps) {
	ctx := context.Background()
	const key = "nar/pending.nar"
	data := make([]byte, 5<<20+4321) // parts other than the last must be at least 5 MiB
	rand.Read(data)
	bodies := [][]byte{data[:5<<20], data[5<<20:]}
	id, err := mp.StartMultipart(ctx, key, bucket.PutOptions{ContentType: "application/x-nix-nar"})
	if err != nil {
		t.Fatal(err)
	}
	var sent []bucket.Part
	for i, body := range bodies {
		sum := md5.Sum(body)
		p, err := mp.PutPart(ctx, key, id, i+1, bytes.NewReader(body), int64(len(body)), sum[:])
		if err != nil {
			t.Fatalf("PutPart %d: %v", i+1, err)
		}
		if p.Number != i+1 || p.Size != int64(len(body)) || p.ETag == "" {
			t.Fatalf("PutPart %d = %+v", i+1, p)
		}
		if caps.PartETagIsMD5 && !strings.EqualFold(p.ETag, hex.EncodeToString(sum[:])) {
			t.Errorf("part %d ETag %q is not the MD5 of its bytes %x", i+1, p.ETag, sum)
		}
		sent = append(sent, p)
	}
	// A part whose bytes do not match the MD5 sent with them is refused,
	// and the part stored before stays.
	wrong := md5.Sum([]byte("something else"))
	if _, err := mp.PutPart(ctx, key, id, 2, bytes.NewReader(bodies[1]), int64(len(bodies[1])), wrong[:]); err == nil {
		t.Fatal("PutPart with a wrong Content-MD5 succeeded")
	}
	parts, err := mp.ListParts(ctx, key, id)
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 2 {
		t.Fatalf("ListParts = %+v, want 2 parts", parts)
	}
	for i, p := range parts {
		if p != sent[i] {
			t.Errorf("ListParts[%d] = %+v, PutPart said %+v", i, p, sent[i])
		}
	}
	listed := func(prefix string) bool {
		ups, err := mp.ListUploads(ctx, prefix)
		if err != nil {
			t.Fatalf("ListUploads(%q): %v", prefix, err)
		}
		for _, u := range ups {
			if u.Key == key && u.UploadID == id && !u.Initiated.IsZero() {
				return true
			}
		}
		return false
	}
	if !listed(key) {
		t.Errorf("ListUploads(%q) does not list upload %s", key, id)
	}
	if caps.ListUploadsByPrefix && !listed("nar/") {
		t.Errorf("ListUploads(\"nar/\") does not list upload %s of %s", id, key)
	}
	if _, err := b.Stat(ctx, key); !bucket.IsNotExist(err) {
		t.Fatalf("an unfinished upload is visible: Stat = %v", err)
	}
	if err := mp.CompleteMultipart(ctx, key, id, parts); err != nil {
		t.Fatal(err)
	}
	got, _, err := b.Get(ctx, key, int64(len(data)))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the completed object has %d bytes (%v), want the %d sent", len(got), err, len(data))
	}
	if _, err := mp.ListParts(ctx, key, id); !bucket.IsNotExist(err) {
		t.Errorf("ListParts of a completed upload = %v, want ErrNotExist", err)
	}
	if listed(key) {
		t.Errorf("a completed upload is still listed")
	}
	b.Delete(ctx, key)

	// An aborted upload is gone: ListParts says so (the uploader then
	// starts over), and aborting again is not an error.
	id, err = mp.StartMultipart(ctx, key, bucket.PutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := mp.AbortMultipart(ctx, key, id); err != nil {
		t.Fatal(err)
	}
	if _, err := mp.ListParts(ctx, key, id); !bucket.IsNotExist(err) {
		t.Errorf("ListParts of an aborted upload = %v, want ErrNotExist", err)
	}
	if err := mp.AbortMultipart(ctx, key, id); err != nil {
		t.Errorf("aborting an aborted upload = %v, want nil", err)
	}
	if _, err := b.Stat(ctx, key); !bucket.IsNotExist(err) {
		t.Errorf("an aborted upload left an object: %v", err)
	}
}

// conditionalWrites checks create-only writes (IfNoneMatch) and
// compare-and-swap (IfMatch), and that ProbeConditional finds them.
func conditionalWrites(t *testing.T, b bucket.Bucket) {
	ctx := context.Background()
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
	if err := bucket.ProbeIfMatch(ctx, b, "nixspool/probe/"); err != nil {
		t.Fatalf("ProbeIfMatch = %v; want nil", err)
	}
	b.Delete(ctx, "cond.narinfo")
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("disk read error") }
