package uploader

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/nar"
)

// fakeStore serves metadata of real directories standing in for store
// paths.
type fakeStore struct{ infos map[string]*nixstore.PathInfo }

func (f *fakeStore) Closure(_ context.Context, p string) ([]*nixstore.PathInfo, error) {
	return nixstore.ClosureIn(f.infos, p)
}

func (f *fakeStore) QueryPathInfo(_ context.Context, p string) (*nixstore.PathInfo, error) {
	return f.infos[p], nil
}

// recorder wraps a bucket and records the order of successful puts.
type recorder struct {
	bucket.Bucket
	mu      sync.Mutex
	puts    []string
	failKey func(string) bool
	hang    func(string) bool // the Put waits until its context is done
}

func (r *recorder) Put(ctx context.Context, key string, body io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	if r.failKey != nil && r.failKey(key) {
		return bucket.Info{}, fmt.Errorf("put %s: %w: injected", key, bucket.ErrPermanent)
	}
	if r.hang != nil && r.hang(key) {
		<-ctx.Done()
		return bucket.Info{}, fmt.Errorf("put %s: %w", key, ctx.Err())
	}
	info, err := r.Bucket.Put(ctx, key, body, size, opts)
	if err != nil {
		return info, err
	}
	r.mu.Lock()
	r.puts = append(r.puts, key)
	r.mu.Unlock()
	return info, nil
}

func (r *recorder) index(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, k := range r.puts {
		if k == key {
			return i
		}
	}
	return -1
}

func (r *recorder) count(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, k := range r.puts {
		if strings.HasPrefix(k, prefix) {
			n++
		}
	}
	return n
}

type fixture struct {
	store *fakeStore
	dir   string
	rec   *recorder
	key   signature.SecretKey
	pub   signature.PublicKey
}

var hashes = []string{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "cccccccccccccccccccccccccccccccc", "dddddddddddddddddddddddddddddddd"}

// newFixture makes paths named by the hashes above, each a directory with
// a file; refs[i] lists the indexes path i references.
func newFixture(t *testing.T, refs map[int][]int) *fixture {
	t.Helper()
	f := &fixture{store: &fakeStore{infos: map[string]*nixstore.PathInfo{}}, dir: t.TempDir()}
	var err error
	f.key, f.pub, err = signature.GenerateKeypair("test-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	path := func(i int) string { return filepath.Join(f.dir, hashes[i]+"-p"+fmt.Sprint(i)) }
	for i := range hashes {
		p := path(i)
		os.MkdirAll(p, 0o755)
		os.WriteFile(filepath.Join(p, "data"), bytes.Repeat([]byte{byte('a' + i)}, 1000*(i+1)), 0o644)
		h := sha256.New()
		n, _, err := nar.Dump(h, p, false)
		if err != nil {
			t.Fatal(err)
		}
		info := &nixstore.PathInfo{Path: p, NarHash: h.Sum(nil), NarSize: uint64(n), Deriver: filepath.Join(f.dir, "x-p.drv")}
		for _, r := range refs[i] {
			info.References = append(info.References, path(r))
		}
		f.store.infos[p] = info
	}
	fb, err := filebucket.New(filepath.Join(f.dir, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	f.rec = &recorder{Bucket: fb}
	return f
}

func (f *fixture) path(i int) string { return filepath.Join(f.dir, hashes[i]+"-p"+fmt.Sprint(i)) }

func (f *fixture) uploader(t *testing.T, opt Options) *Uploader {
	t.Helper()
	c, _ := cacheurl.Parse("file://" + filepath.Join(f.dir, "cache") + "?write-nar-listing=1")
	opt.Bucket, opt.Cache, opt.Store, opt.Keys = f.rec, c, f.store, []signature.SecretKey{f.key}
	opt.TempDir = filepath.Join(f.dir, "tmp")
	u, err := New(opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close) // before the temp dirs go: no worker writes into them
	return u
}

func (f *fixture) narinfo(t *testing.T, i int) *narinfo.NarInfo {
	t.Helper()
	data, _, err := f.rec.Get(context.Background(), hashes[i]+".narinfo", 1<<20)
	if err != nil {
		t.Fatalf("narinfo of p%d: %v", i, err)
	}
	ni, err := narinfo.Parse(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	return ni
}

// TestUploadOrder: NARs before narinfos, and every narinfo after the
// narinfos of its references; signatures verify; existing ones are kept.
func TestUploadOrder(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}, 2: {0, 1, 2}}) // p2 refers to itself too
	other, _, _ := signature.GenerateKeypair("upstream-1", nil)
	info0 := f.store.infos[f.path(0)]
	sig, _ := other.Sign(nil, "something")
	info0.Sigs = []string{sig.String(), "test-1:" + strings.Repeat("A", 86) + "=="} // our old signature is replaced
	u := f.uploader(t, Options{})
	res, err := u.Upload(context.Background(), f.path(2))
	if err != nil {
		t.Fatal(err)
	}
	if res.Paths != 3 {
		t.Fatalf("uploaded %d paths, want 3", res.Paths)
	}
	for i := 0; i <= 2; i++ {
		ni := f.narinfo(t, i)
		ninfo := f.rec.index(hashes[i] + ".narinfo")
		if nar := f.rec.index(ni.URL); nar < 0 || nar > ninfo {
			t.Errorf("p%d: NAR %s at %d, narinfo at %d", i, ni.URL, nar, ninfo)
		}
		if ls := f.rec.index(hashes[i] + ".ls"); ls < 0 || ls > ninfo {
			t.Errorf("p%d: listing at %d, narinfo at %d", i, ls, ninfo)
		}
		for _, r := range f.store.infos[f.path(i)].References {
			if r == f.path(i) {
				continue
			}
			if ri := f.rec.index(filepath.Base(r)[:32] + ".narinfo"); ri < 0 || ri > ninfo {
				t.Errorf("p%d's narinfo (%d) comes before its reference %s (%d)", i, ninfo, r, ri)
			}
		}
		if !signature.VerifyFirst(ni.Fingerprint(), ni.Signatures, []signature.PublicKey{f.pub}) {
			t.Errorf("p%d: our signature does not verify", i)
		}
	}
	sigs := f.narinfo(t, 0).Signatures
	if len(sigs) != 2 || sigs[1].Name != "upstream-1" {
		t.Errorf("p0 signatures = %v, want ours and the kept upstream one", sigs)
	}
	if refs := f.narinfo(t, 2).References; len(refs) != 3 || refs[2] != filepath.Base(f.path(2)) {
		t.Errorf("p2 references = %v (want sorted base names, self included)", refs)
	}
	// Uploading again sends nothing: the presence cache knows.
	before := len(f.rec.puts)
	if _, err := u.Upload(context.Background(), f.path(2)); err != nil || len(f.rec.puts) != before {
		t.Fatalf("second upload put %d objects (err %v)", len(f.rec.puts)-before, err)
	}
}

func TestHashMismatchUploadsNothing(t *testing.T) {
	f := newFixture(t, nil)
	f.store.infos[f.path(0)].NarHash = make([]byte, 32)
	u := f.uploader(t, Options{})
	_, err := u.Upload(context.Background(), f.path(0))
	var hm *HashMismatchError
	if !errors.As(err, &hm) || !IsPermanent(err) {
		t.Fatalf("Upload = %v, want a permanent hash mismatch", err)
	}
	if f.rec.count("nar/") != 0 || f.rec.count(hashes[0]) != 0 {
		t.Fatalf("objects uploaded for a corrupt path: %v", f.rec.puts)
	}
}

func TestFailedDependencyBlocksNarinfos(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}, 2: {1}})
	u := f.uploader(t, Options{})
	nar0 := ""
	f.rec.failKey = func(k string) bool {
		if k == hashes[0]+".narinfo" {
			nar0 = k
			return true
		}
		return false
	}
	if _, err := u.Upload(context.Background(), f.path(2)); err == nil {
		t.Fatal("Upload succeeded although a dependency failed")
	}
	if nar0 == "" || f.rec.index(hashes[1]+".narinfo") >= 0 || f.rec.index(hashes[2]+".narinfo") >= 0 {
		t.Fatalf("narinfos written above a failed dependency: %v", f.rec.puts)
	}
}

func TestSharedDependencyUploadedOnce(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}, 2: {0}, 3: {0}})
	u := f.uploader(t, Options{})
	var wg sync.WaitGroup
	for _, i := range []int{1, 2, 3} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := u.Upload(context.Background(), f.path(i)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := f.rec.count(hashes[0] + ".narinfo"); n != 1 {
		t.Fatalf("shared dependency's narinfo written %d times", n)
	}
}

func TestUpstreamDependencyCountsAsPresent(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	u := f.uploader(t, Options{Upstream: func(i *nixstore.PathInfo) bool { return i.Path == f.path(0) }})
	res, err := u.Upload(context.Background(), f.path(1))
	if err != nil {
		t.Fatal(err)
	}
	if res.Skipped != 1 || res.Paths != 1 || f.rec.index(hashes[0]+".narinfo") >= 0 || f.rec.index(hashes[1]+".narinfo") < 0 {
		t.Fatalf("result %+v, puts %v", res, f.rec.puts)
	}
}

func TestInvalidPathIsPermanent(t *testing.T) {
	f := newFixture(t, nil)
	u := f.uploader(t, Options{})
	_, err := u.Upload(context.Background(), filepath.Join(f.dir, "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-gone"))
	if !IsPermanent(err) {
		t.Fatalf("Upload of an unknown path = %v, want permanent", err)
	}
}

func TestLoadSecretKeys(t *testing.T) {
	dir := t.TempDir()
	sk, _, _ := signature.GenerateKeypair("k-1", nil)
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte(sk.String()+"\n"), 0o600) // trailing newline is trimmed
	if keys, err := LoadSecretKeys([]string{good}, false); err != nil || len(keys) != 1 {
		t.Fatalf("LoadSecretKeys = %v, %v", keys, err)
	}
	loose := filepath.Join(dir, "loose")
	os.WriteFile(loose, []byte(sk.String()), 0o644)
	if _, err := LoadSecretKeys([]string{loose}, false); err == nil || !strings.Contains(err.Error(), "readable by group or others") {
		t.Fatalf("group-readable key accepted: %v", err)
	}
	if _, err := LoadSecretKeys([]string{loose}, true); err != nil {
		t.Fatalf("--allow-insecure-key-perms: %v", err)
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("not a key"), 0o600)
	_, err := LoadSecretKeys([]string{bad}, false)
	if err == nil || strings.Contains(err.Error(), "not a key") {
		t.Fatalf("bad key: %v (the error must not echo the file's content)", err)
	}
}

// TestNarinfoSignatureOrder: the Sig lines are in Nix's order (key name,
// then raw bytes; Nix ≥ 2.34 writes them so), each once; the store's
// signatures from other keys are kept unless they are corrupt.
func TestNarinfoSignatureOrder(t *testing.T) {
	f := newFixture(t, nil)
	ours := f.key.ToPublicKey().Name
	raw := func(name string, b byte) string {
		return signature.Signature{Name: name, Data: bytes.Repeat([]byte{b}, 64)}.String()
	}
	// "<ours>-x" sorts after ours by name but before it as a string;
	// under one name, 0x00 bytes ("AAAA") sort before 0xff ("////").
	f.store.infos[f.path(0)].Sigs = []string{raw(ours+"-x", 0), raw("zz", 0xff), raw("zz", 0), raw("zz", 0), "zz:corrupt"}
	u := f.uploader(t, Options{})
	if _, err := u.Upload(context.Background(), f.path(0)); err != nil {
		t.Fatal(err)
	}
	data, _, err := f.rec.Get(context.Background(), hashes[0]+".narinfo", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		if s, ok := strings.CutPrefix(l, "Sig: "); ok {
			lines = append(lines, s)
		}
	}
	if len(lines) != 4 || !strings.HasPrefix(lines[0], ours+":") || lines[1] != raw(ours+"-x", 0) || lines[2] != raw("zz", 0) || lines[3] != raw("zz", 0xff) {
		t.Fatalf("Sig lines:\n%s", strings.Join(lines, "\n"))
	}
}
