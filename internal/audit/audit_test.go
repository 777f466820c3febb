package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/nar"
)

// cache builds small caches by hand, the way Nix lays them out.
type cache struct {
	t   *testing.T
	b   bucket.Bucket
	key signature.SecretKey
}

func newCache(t *testing.T) *cache {
	b, err := filebucket.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	sk, _, err := signature.GenerateKeypair("audit-test-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &cache{t: t, b: b, key: sk}
	c.put("nix-cache-info", []byte("StoreDir: /nix/store\n"))
	return c
}

func (c *cache) put(key string, data []byte) {
	c.t.Helper()
	if _, err := c.b.Put(context.Background(), key, bytes.NewReader(data), int64(len(data)), bucket.PutOptions{}); err != nil {
		c.t.Fatal(err)
	}
}

func hashOf(i int) string {
	s := fmt.Sprintf("%032d", i)
	return strings.NewReplacer("0", "a", "1", "b", "2", "c", "3", "d", "4", "f", "5", "g", "6", "h", "7", "i", "8", "j", "9", "k").Replace(s)
}

// path adds a store path i with contents and references refs (indexes),
// zstd-compressed; it returns the narinfo key.
func (c *cache) path(i int, contents string, refs ...int) string {
	c.t.Helper()
	src := filepath.Join(c.t.TempDir(), "f")
	os.WriteFile(src, []byte(contents), 0o644)
	var narBuf bytes.Buffer
	if _, _, err := nar.Dump(&narBuf, src, false); err != nil {
		c.t.Fatal(err)
	}
	enc, _ := zstd.NewWriter(nil)
	file := enc.EncodeAll(narBuf.Bytes(), nil)
	fileSum, narSum := sha256.Sum256(file), sha256.Sum256(narBuf.Bytes())
	url := "nar/" + nixbase32.EncodeToString(fileSum[:]) + ".nar.zst"
	c.put(url, file)
	ni := &cachefmt.NarInfo{
		StorePath: fmt.Sprintf("/nix/store/%s-p%d", hashOf(i), i), URL: url, Compression: "zstd",
		FileHash: "sha256:" + nixbase32.EncodeToString(fileSum[:]), FileSize: int64(len(file)),
		NarHash: "sha256:" + nixbase32.EncodeToString(narSum[:]), NarSize: int64(narBuf.Len()),
	}
	for _, r := range refs {
		ni.References = append(ni.References, fmt.Sprintf("%s-p%d", hashOf(r), r))
	}
	fp, err := Fingerprint(ni)
	if err != nil {
		c.t.Fatal(err)
	}
	sig, _ := c.key.Sign(nil, fp)
	var b strings.Builder
	fmt.Fprintf(&b, "StorePath: %s\nURL: %s\nCompression: %s\nFileHash: %s\nFileSize: %d\nNarHash: %s\nNarSize: %d\nReferences: %s\nSig: %s\nFutureField: ignored\n",
		ni.StorePath, ni.URL, ni.Compression, ni.FileHash, ni.FileSize, ni.NarHash, ni.NarSize, strings.Join(ni.References, " "), sig.String())
	key := hashOf(i) + ".narinfo"
	c.put(key, []byte(b.String()))
	return key
}

func (c *cache) audit(opt Options) *Report {
	c.t.Helper()
	rep, err := Run(context.Background(), c.b, opt)
	if err != nil {
		c.t.Fatal(err)
	}
	return rep
}

func kinds(r *Report) string {
	var k []string
	for _, p := range r.Problems {
		k = append(k, p.Kind)
	}
	return strings.Join(k, ",")
}

func TestHealthyCache(t *testing.T) {
	c := newCache(t)
	c.path(1, "leaf")
	c.path(2, "mid", 1)
	c.path(3, "top", 1, 2, 3) // a self-reference is fine
	c.put("nar/orphan.nar.zst", []byte("left over"))
	rep := c.audit(Options{Deep: true, TrustedKeys: []signature.PublicKey{c.key.ToPublicKey()}})
	if !rep.OK() || rep.Narinfos != 3 || rep.NARs != 4 || rep.OrphanNARs != 1 {
		t.Fatalf("report %s: %v", rep.Summary(), rep.Problems)
	}
	if !strings.Contains(rep.Summary(), "healthy") {
		t.Fatalf("summary %q", rep.Summary())
	}
}

func TestFindsEachProblem(t *testing.T) {
	for name, tc := range map[string]struct {
		breakIt func(c *cache)
		opt     Options
		want    string
	}{
		"missing NAR": {func(c *cache) {
			k := c.path(5, "x")
			data, _, _ := c.b.Get(context.Background(), k, 1<<20)
			ni, _ := cachefmt.ParseNarInfo(data)
			c.b.Delete(context.Background(), ni.URL)
		}, Options{}, KindMissingNAR},
		"missing reference": {func(c *cache) { c.path(6, "x", 7) }, Options{}, KindMissingRef},
		"wrong compression": {func(c *cache) {
			k := c.path(8, "x")
			data, _, _ := c.b.Get(context.Background(), k, 1<<20)
			c.put(k, bytes.Replace(data, []byte("Compression: zstd"), []byte("Compression: none"), 1))
		}, Options{}, KindCompression},
		"wrong size": {func(c *cache) {
			k := c.path(9, "x")
			data, _, _ := c.b.Get(context.Background(), k, 1<<20)
			ni, _ := cachefmt.ParseNarInfo(data)
			c.put(ni.URL, append(mustGet(c, ni.URL), 0))
		}, Options{}, KindNARSize},
		"NarHash mismatch (deep)": {func(c *cache) {
			k := c.path(10, "contents")
			data, _, _ := c.b.Get(context.Background(), k, 1<<20)
			ni, _ := cachefmt.ParseNarInfo(data)
			c.put(k, bytes.Replace(data, []byte(ni.NarHash), []byte("sha256:"+strings.Repeat("0", 52)), 1))
		}, Options{Deep: true}, KindHash},
		"unparsable": {func(c *cache) { c.put(hashOf(11)+".narinfo", []byte("garbage\n")) }, Options{}, KindUnparsable},
		"wrong store path": {func(c *cache) {
			k := c.path(12, "x")
			data, _, _ := c.b.Get(context.Background(), k, 1<<20)
			c.put(hashOf(13)+".narinfo", data)
		}, Options{}, KindStorePath},
		"untrusted": {func(c *cache) {
			k := c.path(14, "x")
			data, _, _ := c.b.Get(context.Background(), k, 1<<20)
			c.put(k, bytes.Replace(data, []byte("Sig: audit-test-1:"), []byte("Sig: other-1:"), 1))
		}, Options{}, KindSignature},
		"no nix-cache-info": {func(c *cache) { c.b.Delete(context.Background(), "nix-cache-info") }, Options{}, KindCacheInfo},
		"realisation without output": {func(c *cache) {
			c.realisation(idOf(1), 15, nil)
		}, Options{}, KindRealisationOuput},
		"realisation dependency missing": {func(c *cache) {
			c.path(16, "x", 1)
			c.realisation(idOf(2), 16, map[string]int{idOf(3): 1})
		}, Options{}, KindRealisationDep},
		"realisation dependency realised differently": {func(c *cache) {
			c.path(17, "x", 1)
			c.path(18, "y")
			c.realisation(idOf(4), 18, nil)
			c.realisation(idOf(5), 17, map[string]int{idOf(4): 1})
		}, Options{}, KindRealisationDep},
		"realisation under another id": {func(c *cache) {
			c.put("realisations/"+idOf(6)+".doi", mustGet(c, c.realisation(idOf(7), 1, nil)))
			c.b.Delete(context.Background(), "realisations/"+idOf(7)+".doi")
		}, Options{}, KindRealisation},
		"realisation not JSON": {func(c *cache) { c.put("realisations/"+idOf(8)+".doi", []byte("<html>")) }, Options{}, KindRealisation},
		"unsigned realisation": {func(c *cache) {
			c.put("realisations/"+idOf(9)+".doi", []byte(`{"dependentRealisations":{},"id":"`+idOf(9)+`","outPath":"`+hashOf(1)+`-p1","signatures":[]}`))
		}, Options{TrustedKeys: []signature.PublicKey{}}, KindSignature},
		"build trace entry without output": {func(c *cache) {
			c.buildTrace(hashOf(20)+"-p20.drv", 19)
		}, Options{}, KindRealisationOuput},
		"build trace entry under a bad key": {func(c *cache) {
			c.put("build-trace-v2/not-a-drv/out.doi", []byte(`{"outPath":"`+hashOf(1)+`-p1","signatures":[]}`))
		}, Options{}, KindRealisation},
	} {
		t.Run(name, func(t *testing.T) {
			c := newCache(t)
			c.path(1, "healthy")
			tc.breakIt(c)
			if tc.want == KindSignature || tc.opt.TrustedKeys != nil {
				tc.opt.TrustedKeys = []signature.PublicKey{c.key.ToPublicKey()}
			}
			rep := c.audit(tc.opt)
			if kinds(rep) != tc.want {
				t.Fatalf("problems %v, want exactly one %s", rep.Problems, tc.want)
			}
		})
	}
}

func mustGet(c *cache, key string) []byte {
	data, _, err := c.b.Get(context.Background(), key, 1<<30)
	if err != nil {
		c.t.Fatal(err)
	}
	return data
}

// flaky throttles the first two requests for every key.
type flaky struct {
	bucket.Bucket
	mu   sync.Mutex
	seen map[string]int
}

func (f *flaky) fault(key string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen[key]++
	if f.seen[key] <= 2 {
		return fmt.Errorf("get %s: %w: %w", key, bucket.ErrUnavailable, bucket.ErrThrottled)
	}
	return nil
}

func (f *flaky) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	if err := f.fault(key); err != nil {
		return nil, bucket.Info{}, err
	}
	return f.Bucket.Get(ctx, key, max)
}

func (f *flaky) Open(ctx context.Context, key string, off, n int64) (io.ReadCloser, bucket.Info, error) {
	if err := f.fault("open " + key); err != nil {
		return nil, bucket.Info{}, err
	}
	return f.Bucket.Open(ctx, key, off, n)
}

// TestThrottlingStoreIsNotAProblem: requests the store refuses for now are
// asked again; the audit reports the cache, not the store's load.
func TestThrottlingStoreIsNotAProblem(t *testing.T) {
	c := newCache(t)
	c.path(1, "leaf")
	c.path(2, "top", 1)
	rep, err := Run(context.Background(), &flaky{Bucket: c.b, seen: map[string]int{}}, Options{Deep: true})
	if err != nil || !rep.OK() {
		t.Fatalf("%v %v", rep.Problems, err)
	}
}

// idOf is a realisation id (derivation output) i.
func idOf(i int) string { return fmt.Sprintf("sha256:%064x!out", i) }

// realisation writes a signed realisation (Nix 2.8 layout) of id by store
// path out (an index of path), depending on deps (id → path index).
func (c *cache) realisation(id string, out int, deps map[string]int) string {
	c.t.Helper()
	r := &nixstore.Realisation{ID: id, OutPath: fmt.Sprintf("%s-p%d", hashOf(out), out), DependentRealisations: map[string]string{}}
	for d, i := range deps {
		r.DependentRealisations[d] = fmt.Sprintf("%s-p%d", hashOf(i), i)
	}
	if err := realisation.Sign(r, []signature.SecretKey{c.key}); err != nil {
		c.t.Fatal(err)
	}
	c.put(realisation.Key(id), realisation.Document(r))
	return realisation.Key(id)
}

// buildTrace writes a signed build trace entry (Nix 2.35 layout).
func (c *cache) buildTrace(drvBase string, out int) string {
	c.t.Helper()
	outPath := fmt.Sprintf("%s-p%d", hashOf(out), out)
	body, err := realisation.BuildTraceDocument(drvBase, "out", outPath, []signature.SecretKey{c.key}, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	c.put(realisation.BuildTraceKey(drvBase, "out"), body)
	return realisation.BuildTraceKey(drvBase, "out")
}

// TestHealthyRealisations: realisations in both layouts, one depending on
// another, signed, pass an audit with trusted keys; so does a build trace
// entry signed in the older string form.
func TestHealthyRealisations(t *testing.T) {
	c := newCache(t)
	c.path(1, "dep")
	c.path(2, "top", 1)
	c.realisation(idOf(1), 1, nil)
	c.realisation(idOf(2), 2, map[string]int{idOf(1): 1})
	c.buildTrace(hashOf(3)+"-p2.drv", 2)
	drv := hashOf(4) + "-p1.drv"
	fp := realisation.BuildTraceFingerprint(drv, "out", hashOf(1)+"-p1")
	sig, _ := c.key.Sign(nil, string(fp))
	c.put(realisation.BuildTraceKey(drv, "out"), []byte(`{"outPath":"`+hashOf(1)+`-p1","signatures":["`+sig.String()+`"]}`))
	rep := c.audit(Options{TrustedKeys: []signature.PublicKey{c.key.ToPublicKey()}})
	if !rep.OK() || rep.Realisations != 4 {
		t.Fatalf("report %s: %v", rep.Summary(), rep.Problems)
	}
	// The same cache with a key that signed none of it.
	other, _, _ := signature.GenerateKeypair("other-1", nil)
	rep = c.audit(Options{TrustedKeys: []signature.PublicKey{other.ToPublicKey()}})
	n := 0
	for _, p := range rep.Problems {
		if p.Kind == KindSignature && (strings.HasPrefix(p.Key, "realisations/") || strings.HasPrefix(p.Key, "build-trace-v2/")) {
			n++
		}
	}
	if n != 4 {
		t.Fatalf("%d realisation signature problems with an unknown key, want 4: %v", n, rep.Problems)
	}
}
