package uploader

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/nar"
	"github.com/nixspool/nixspool/storepath"
)

// world is a fake store of n paths with real contents on disk, and a file
// bucket behind a counting wrapper.
type world struct {
	t     *testing.T
	dir   string
	store *fakeStore
	paths []string
	b     *counting
	fb    *filebucket.Bucket
	key   signature.SecretKey
}

func hashFor(i int) string {
	sum := sha256.Sum256([]byte(fmt.Sprint("path-", i)))
	return nixbase32.EncodeToString(sum[:20])
}

// newWorld makes n paths; refs(i) lists the paths i references (all below
// i), size(i) its file's size (random bytes: incompressible).
func newWorld(t *testing.T, n int, refs func(i int) []int, size func(i int) int) *world {
	t.Helper()
	w := &world{t: t, dir: t.TempDir(), store: &fakeStore{infos: map[string]*nixstore.PathInfo{}}}
	var err error
	if w.key, _, err = signature.GenerateKeypair("test-1", nil); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		p := filepath.Join(w.dir, "store", hashFor(i)+"-p"+fmt.Sprint(i))
		os.MkdirAll(filepath.Dir(p), 0o755)
		data := make([]byte, size(i))
		rand.Read(data)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		sz, _, err := nar.Dump(h, p, false)
		if err != nil {
			t.Fatal(err)
		}
		info := &nixstore.PathInfo{Path: p, NarHash: h.Sum(nil), NarSize: uint64(sz)}
		for _, r := range refs(i) {
			info.References = append(info.References, w.paths[r])
		}
		w.paths = append(w.paths, p)
		w.store.infos[p] = info
	}
	w.fb, err = filebucket.New(filepath.Join(w.dir, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	w.b = &counting{Bucket: w.fb}
	return w
}

func (w *world) uploader(opt Options) *Uploader {
	w.t.Helper()
	c, _ := cacheurl.Parse("file://" + filepath.Join(w.dir, "cache"))
	if opt.Bucket == nil {
		opt.Bucket = w.b
	}
	opt.Cache, opt.Store, opt.Keys = c, w.store, []signature.SecretKey{w.key}
	opt.TempDir = filepath.Join(w.dir, "tmp")
	u, err := New(opt)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(u.Close)
	return u
}

func (w *world) has(i int) bool {
	_, err := w.fb.Stat(context.Background(), hashFor(i)+".narinfo")
	return err == nil
}

// counting wraps a bucket: it counts calls by kind, tracks how many Puts
// run at once, and can delay or fail them.
type counting struct {
	bucket.Bucket
	stats, lists, puts atomic.Int64
	gets               atomic.Int64
	inPut, maxInPut    atomic.Int64
	putDelay           time.Duration
	bigPutDelay        time.Duration // instead of putDelay for bodies of 500 kB and more
	failPut            func(key string) error
	staleStat          func(key string) bool // answer NotExist although it exists
	oldCacheInfo       bool                  // nix-cache-info answers a Last-Modified long ago
}

func (c *counting) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	c.gets.Add(1)
	data, info, err := c.Bucket.Get(ctx, key, max)
	if c.oldCacheInfo && key == "nix-cache-info" {
		info.LastModified = time.Unix(1e9, 0)
	}
	return data, info, err
}

func (c *counting) Stat(ctx context.Context, key string) (bucket.Info, error) {
	c.stats.Add(1)
	if c.staleStat != nil && c.staleStat(key) {
		return bucket.Info{}, fmt.Errorf("stat %s: %w", key, bucket.ErrNotExist)
	}
	return c.Bucket.Stat(ctx, key)
}

func (c *counting) List(ctx context.Context, o bucket.ListOptions, fn func(bucket.Object) error) error {
	c.lists.Add(1)
	return c.Bucket.List(ctx, o, fn)
}

func (c *counting) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	n := c.inPut.Add(1)
	defer c.inPut.Add(-1)
	for {
		m := c.maxInPut.Load()
		if n <= m || c.maxInPut.CompareAndSwap(m, n) {
			break
		}
	}
	if c.failPut != nil {
		if err := c.failPut(key); err != nil {
			return bucket.Info{}, err
		}
	}
	if strings.HasPrefix(key, "nar/") {
		if size >= 500<<10 && c.bigPutDelay > 0 {
			time.Sleep(c.bigPutDelay)
		} else if c.putDelay > 0 {
			time.Sleep(c.putDelay)
		}
	}
	if !strings.HasPrefix(key, "nixspool/") && key != "nix-cache-info" {
		c.puts.Add(1)
	}
	return c.Bucket.Put(ctx, key, r, size, opts)
}

// waitFor polls cond until it holds (or fails the test after 10 s).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
}

func chain(i int) []int {
	if i == 0 {
		return nil
	}
	return []int{i - 1}
}

func flat(n int) func(int) []int {
	return func(i int) []int {
		if i < n-1 {
			return nil
		}
		all := make([]int, n-1)
		for j := range all {
			all[j] = j
		}
		return all
	}
}

func size(n int) func(int) int { return func(int) int { return n } }

// TestExcludedDependencyIsUploadedAnyway: an exclusion applies to the path
// a job is for; a dependency needed by an uploaded path goes up regardless,
// so no narinfo names a reference the cache lacks.
func TestExcludedDependencyIsUploadedAnyway(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	excluded := func(i *nixstore.PathInfo) bool { return i.Path == w.paths[0] }
	u := w.uploader(Options{Exclude: excluded})
	if res, err := u.Upload(context.Background(), w.paths[0]); err != nil || res.Skipped != 1 || w.has(0) {
		t.Fatalf("job for the excluded path: %+v, %v, uploaded %v", res, err, w.has(0))
	}
	res, err := u.Upload(context.Background(), w.paths[2])
	if err != nil || res.Paths != 3 || !w.has(0) {
		t.Fatalf("job above it: %+v, %v; excluded dependency uploaded: %v", res, err, w.has(0))
	}
}

// TestNarinfoIsNeverReplaced: a narinfo another writer put in place between
// our presence check and our write stays as it was (its signatures too),
// with a store that honours create-only writes and with one that ignores
// them (a HEAD right before the write then protects it).
func TestNarinfoIsNeverReplaced(t *testing.T) {
	for _, conditional := range []bool{true, false} {
		t.Run(fmt.Sprint("conditional=", conditional), func(t *testing.T) {
			w := newWorld(t, 2, chain, size(100))
			key := hashFor(0) + ".narinfo"
			theirs := []byte("StorePath: " + w.paths[0] + "\nURL: nar/x.nar\nNarHash: sha256:" + strings.Repeat("0", 52) + "\nNarSize: 1\nSig: other-1:xyz\n")
			w.fb.Put(context.Background(), key, bytes.NewReader(theirs), int64(len(theirs)), bucket.PutOptions{})
			// The presence check does not see it yet (it arrives right
			// after); later requests do.
			var asked atomic.Int32
			w.b.staleStat = func(k string) bool { return k == key && asked.Add(1) == 1 }
			var b bucket.Bucket = w.b
			if !conditional {
				b = &ignoresConditions{w.b}
			}
			u := w.uploader(Options{Bucket: b})
			res, err := u.Upload(context.Background(), w.paths[0])
			if err != nil || res.Kept != 1 || res.Paths != 0 {
				t.Fatalf("Upload = %+v, %v; want the other writer's narinfo kept", res, err)
			}
			got, _, _ := w.fb.Get(context.Background(), key, 1<<20)
			if !bytes.Equal(got, theirs) {
				t.Fatalf("the other writer's narinfo was replaced:\n%s", got)
			}
		})
	}
}

// ignoresConditions is a store that silently ignores conditional writes.
type ignoresConditions struct{ bucket.Bucket }

func (b *ignoresConditions) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	opts.IfNoneMatch, opts.IfMatch = false, ""
	return b.Bucket.Put(ctx, key, r, size, opts)
}

func TestConditionalProbeFindsStoresThatIgnoreIt(t *testing.T) {
	w := newWorld(t, 1, chain, size(10))
	if ok, err := w.uploader(Options{}).pub.conditionalWrites(context.Background()); !ok || err != nil {
		t.Fatalf("the file bucket honours create-only writes; probe = %v, %v", ok, err)
	}
	if ok, err := w.uploader(Options{Bucket: &ignoresConditions{w.b}}).pub.conditionalWrites(context.Background()); ok || err != nil {
		t.Fatalf("a store ignoring If-None-Match: probe = %v, %v; want false", ok, err)
	}
}

// TestUndecidedProbeWritesNothingPlain: while the probe for create-only
// writes cannot tell (its requests fail), nix-cache-info and narinfos are
// not written at all; before, they were written after a HEAD without the
// condition, and replaced another agent's nix-cache-info written between
// the two requests (a reset's generation lost).
func TestUndecidedProbeWritesNothingPlain(t *testing.T) {
	w := newWorld(t, 1, chain, size(10))
	var plain atomic.Int64
	var failProbe atomic.Bool
	failProbe.Store(true)
	w.b.failPut = func(key string) error {
		if strings.HasPrefix(key, "nixspool/probe/") && failProbe.Load() {
			return fmt.Errorf("injected: %w", bucket.ErrUnavailable)
		}
		return nil
	}
	b := &watchPlain{Bucket: w.b, plain: &plain}
	u := w.uploader(Options{Bucket: b})
	if _, err := u.Upload(context.Background(), w.paths[0]); err == nil {
		t.Fatal("upload succeeded although the store's create-only writes could not be probed")
	}
	if n := plain.Load(); n != 0 {
		t.Fatalf("%d narinfo or nix-cache-info writes without If-None-Match", n)
	}
	failProbe.Store(false)
	if _, err := u.Upload(context.Background(), w.paths[0]); err != nil {
		t.Fatal(err)
	}
	if !w.has(0) || plain.Load() != 0 {
		t.Fatalf("after the probe could tell: uploaded %v, plain writes %d", w.has(0), plain.Load())
	}
}

// TestRefusedProbeFallsBack: a store that refuses the probe's writes for
// good (a policy on nixspool/probe/) is taken for one without create-only
// writes: uploads go on, looking before writing, instead of failing for
// good.
func TestRefusedProbeFallsBack(t *testing.T) {
	w := newWorld(t, 1, chain, size(10))
	w.b.failPut = func(key string) error {
		if strings.HasPrefix(key, "nixspool/probe/") {
			return fmt.Errorf("injected AccessDenied: %w", bucket.ErrPermanent)
		}
		return nil
	}
	u := w.uploader(Options{})
	if _, err := u.Upload(context.Background(), w.paths[0]); err != nil {
		t.Fatalf("upload with the probe refused: %v", err)
	}
	if !w.has(0) || u.pub.conditional.Load() != condNo {
		t.Fatalf("uploaded %v, create-only writes %d; want uploaded, looking before writing", w.has(0), u.pub.conditional.Load())
	}
}

// watchPlain counts writes of nix-cache-info and narinfos without
// If-None-Match (or If-Match).
type watchPlain struct {
	bucket.Bucket
	plain *atomic.Int64
}

func (b *watchPlain) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	if (key == "nix-cache-info" || strings.HasSuffix(key, ".narinfo")) && !opts.IfNoneMatch && opts.IfMatch == "" {
		b.plain.Add(1)
	}
	return b.Bucket.Put(ctx, key, r, size, opts)
}

// TestResetBucketIsNoticed: after the bucket is emptied, what was known
// present is forgotten — after a restart (persisted presence) and while
// running (the generation check) — and dependencies go up again.
// s3Like gives objects the identity S3 gives them: the ETag is the MD5 of
// the contents and Last-Modified has whole seconds (here: never changes),
// so only what is written tells two nix-cache-info objects apart.
type s3Like struct{ bucket.Bucket }

func (b s3Like) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	data, info, err := b.Bucket.Get(ctx, key, max)
	sum := md5.Sum(data)
	info.ETag, info.LastModified = hex.EncodeToString(sum[:]), time.Unix(1e9, 0)
	return data, info, err
}

func (b s3Like) Stat(ctx context.Context, key string) (bucket.Info, error) {
	_, info, err := b.Get(ctx, key, 1<<20)
	return info, err
}

// TestResetBucketIsNoticed: a bucket emptied and written again is a new
// generation, even when the new nix-cache-info has the old one's
// Last-Modified.
func TestResetBucketIsNoticed(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	ps := &memPresence{recs: map[string]map[string]time.Time{}}
	u := w.uploader(Options{Presence: ps, Bucket: s3Like{w.b}})
	ctx := context.Background()
	if _, err := u.Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	wipe := w.wipe
	// Restart after a wipe: the persisted presence belongs to the old
	// generation and is not used.
	wipe()
	u2 := w.uploader(Options{Presence: ps, Bucket: s3Like{w.b}})
	if _, err := u2.Upload(ctx, w.paths[2]); err != nil {
		t.Fatal(err)
	}
	if !w.has(0) || !w.has(1) {
		t.Fatal("after a wipe and a restart, dependencies were trusted from the old generation")
	}
	// While running: the generation check notices.
	wipe()
	if err := u2.CheckGeneration(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := u2.Upload(ctx, w.paths[2]); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if !w.has(i) {
			t.Fatalf("after a wipe noticed while running, p%d was not uploaded again", i)
		}
	}
}

type memPresence struct {
	mu   sync.Mutex
	recs map[string]map[string]time.Time
}

func (m *memPresence) AddPresent(id string, hs []string, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.recs[id] == nil {
		m.recs[id] = map[string]time.Time{}
	}
	for _, h := range hs {
		m.recs[id][h] = now
	}
}
func (m *memPresence) Present(id string, nb time.Time) (map[string]time.Time, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]time.Time{}
	for h, at := range m.recs[id] {
		if !at.Before(nb) {
			out[h] = at
		}
	}
	return out, nil
}
func (m *memPresence) PrunePresent(prefix, keep string, nb time.Time) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for id, r := range m.recs {
		if id != keep && strings.HasPrefix(id, prefix) {
			n += len(r)
			delete(m.recs, id)
		}
	}
	return n, nil
}
func (m *memPresence) ForgetPresent(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.recs, id)
	return nil
}

// TestPresenceByListing: a closure of many paths already in the cache is
// reconciled with a listing per hash prefix, not a HEAD per path, and
// nothing is sent again. (The cache is not young: its nix-cache-info is
// dated long ago, so present paths are not verified; see
// TestYoungCacheRepairsNarinfoWithoutNAR.)
func TestPresenceByListing(t *testing.T) {
	const n = 400
	w := newWorld(t, n, flat(n), size(10))
	w.b.oldCacheInfo = true
	// All but the top are in the cache.
	first := w.uploader(Options{})
	for i := 0; i < n-1; i++ {
		if _, err := first.Upload(context.Background(), w.paths[i]); err != nil {
			t.Fatal(err)
		}
	}
	w.b.stats.Store(0)
	w.b.puts.Store(0)
	fresh := w.uploader(Options{})
	res, err := fresh.Upload(context.Background(), w.paths[n-1])
	if err != nil || res.Paths != 1 {
		t.Fatalf("Upload = %+v, %v", res, err)
	}
	if s, l, p := w.b.stats.Load(), w.b.lists.Load(), w.b.puts.Load(); s > 10 || l > 32 || p != 2 {
		t.Fatalf("%d HEADs, %d listings, %d PUTs; want few HEADs, at most 32 listings, and only the top's NAR and narinfo sent", s, l, p)
	}
}

// TestBoundedWork: NAR work for a closure of many paths runs on a fixed
// number of workers, and in-memory NARs stay within their byte budget.
func TestBoundedWork(t *testing.T) {
	const n = 300
	w := newWorld(t, n, flat(n), size(200<<10))
	w.b.putDelay = 5 * time.Millisecond
	u := w.uploader(Options{Workers: 16, SmallBudget: 2 << 20})
	res, err := u.Upload(context.Background(), w.paths[n-1])
	if err != nil || res.Paths != n {
		t.Fatalf("Upload = %+v, %v", res, err)
	}
	// 2 MiB of budget holds at most 7 NARs of 200 kB (+ overhead) at once;
	// narinfo writes may run beside them.
	if max := w.b.maxInPut.Load(); max > 16 {
		t.Fatalf("%d PUTs at once with 16 workers", max)
	}
	if got := runtimeGoroutinesBound(t, u); got > 0 {
		t.Fatalf("%d goroutines per path", got)
	}
}

// runtimeGoroutinesBound checks that no goroutine per path was started:
// the graph is empty after the upload and the workers are the only ones.
func runtimeGoroutinesBound(t *testing.T, u *Uploader) int {
	t.Helper()
	return u.graph.inProgress()
}

// TestPoisonPathFailsOnlyItsDependents: one path whose NAR upload keeps
// failing fails the jobs that need it; a job that does not need it goes on.
func TestPoisonPathFailsOnlyItsDependents(t *testing.T) {
	w := newWorld(t, 4, func(i int) []int {
		if i == 2 {
			return []int{0}
		}
		return nil
	}, size(100))
	// p0 is uploaded first: its NAR is the first NAR put, and keeps failing.
	var poisonKey string
	u := w.uploader(Options{})
	w.b.failPut = func(key string) error {
		if strings.HasPrefix(key, "nar/") && poisonKey == "" {
			poisonKey = key
		}
		if key == poisonKey {
			return fmt.Errorf("put %s: %w: injected", key, bucket.ErrLocal)
		}
		return nil
	}
	if _, err := u.Upload(context.Background(), w.paths[0]); err == nil || !errors.Is(err, bucket.ErrLocal) {
		t.Fatalf("poisoned upload = %v, want the local error", err)
	}
	if _, err := u.Upload(context.Background(), w.paths[2]); err == nil || !strings.Contains(err.Error(), "dependency") {
		t.Fatalf("upload above the poisoned path = %v, want a dependency error", err)
	}
	if _, err := u.Upload(context.Background(), w.paths[3]); err != nil || !w.has(3) {
		t.Fatalf("an unrelated upload failed: %v", err)
	}
	if w.has(2) {
		t.Fatal("narinfo written above a failed dependency")
	}
}

// TestCancelledJobLeavesSharedWork: a job cancelled while a dependency it
// shares with another job is uploading does not cancel the other job.
func TestCancelledJobLeavesSharedWork(t *testing.T) {
	w := newWorld(t, 3, func(i int) []int {
		if i > 0 {
			return []int{0}
		}
		return nil
	}, size(100))
	w.b.putDelay = 200 * time.Millisecond
	u := w.uploader(Options{})
	ctx, cancel := context.WithCancel(context.Background())
	errs := make(chan error, 2)
	go func() { _, err := u.Upload(ctx, w.paths[1]); errs <- err }()
	go func() { _, err := u.Upload(context.Background(), w.paths[2]); errs <- err }()
	// Both jobs planned (three nodes) and p0's NAR in flight.
	waitFor(t, func() bool { return u.graph.inProgress() == 3 && w.b.inPut.Load() > 0 })
	cancel()
	var got []error
	for i := 0; i < 2; i++ {
		got = append(got, <-errs)
	}
	if !w.has(0) || !w.has(2) {
		t.Fatalf("the surviving job did not complete: %v", got)
	}
	cancelled := 0
	for _, err := range got {
		if errors.Is(err, context.Canceled) {
			cancelled++
		} else if err != nil {
			t.Errorf("unexpected error: %v", err)
		}
	}
	if cancelled != 1 {
		t.Fatalf("errors %v: want exactly the cancelled job to end with its context's error", got)
	}
}

func TestNarinfoParsesAsNixDoes(t *testing.T) {
	w := newWorld(t, 2, chain, size(10))
	u := w.uploader(Options{})
	if _, err := u.Upload(context.Background(), w.paths[1]); err != nil {
		t.Fatal(err)
	}
	data, _, _ := w.fb.Get(context.Background(), hashFor(1)+".narinfo", 1<<20)
	ni, err := cachefmt.ParseNarInfo(data)
	if err != nil || len(ni.References) != 1 || ni.Compression != "zstd" {
		t.Fatalf("%+v %v", ni, err)
	}
}

// TestLargeNARsDoNotStarveSmallOnes: many large NARs queued at once run on
// their own workers, a few at a time; small paths queued after them still
// go up at once instead of waiting for every worker to be free again.
func TestLargeNARsDoNotStarveSmallOnes(t *testing.T) {
	const large, small = 8, 10
	w := newWorld(t, large+small, func(int) []int { return nil }, func(i int) int {
		if i < large {
			return smallNAR + 1000
		}
		return 100
	})
	w.b.putDelay, w.b.bigPutDelay = 100*time.Millisecond, 1500*time.Millisecond
	u := w.uploader(Options{Workers: 4, Streams: 1})
	var largeDone atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < large; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := u.Upload(context.Background(), w.paths[i]); err != nil {
				t.Error(err)
			}
			largeDone.Add(1)
		}()
	}
	waitFor(t, func() bool { return u.graph.inProgress() == large }) // the large ones are queued first
	var smallWG sync.WaitGroup
	for i := large; i < large+small; i++ {
		smallWG.Add(1)
		go func() {
			defer smallWG.Done()
			if _, err := u.Upload(context.Background(), w.paths[i]); err != nil {
				t.Error(err)
			}
		}()
	}
	smallWG.Wait()
	if n := largeDone.Load(); n >= large/2 {
		t.Fatalf("the small paths finished only after %d of the %d large ones", n, large)
	}
	wg.Wait()
}

// TestPrefetchSavesAHeadPerJob: a bulk presence check started before many
// jobs are queued answers their first question: the jobs send no HEAD of
// their own, and the bucket is listed at most once per hash prefix.
func TestPrefetchSavesAHeadPerJob(t *testing.T) {
	const n = 200
	w := newWorld(t, n, func(int) []int { return nil }, size(10))
	w.b.oldCacheInfo = true // not young: presence may be listed
	u := w.uploader(Options{})
	if err := u.EnsureCacheInfo(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.b.stats.Store(0)
	u.Prefetch(context.Background(), w.paths)
	var wg sync.WaitGroup
	for _, p := range w.paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := u.Upload(context.Background(), p); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for i := range w.paths {
		if !w.has(i) {
			t.Fatalf("p%d not uploaded", i)
		}
	}
	if s, l := w.b.stats.Load(), w.b.lists.Load(); s > 5 || l > 32 {
		t.Fatalf("%d HEADs and %d listings for %d jobs after a bulk check; want no HEAD per job", s, l, n)
	}
}

// failingStat fails every HEAD after the first few, slowly, and counts
// them.
type failingStat struct {
	bucket.Bucket
	n atomic.Int64
}

func (f *failingStat) Stat(ctx context.Context, key string) (bucket.Info, error) {
	if f.n.Add(1) > 3 {
		time.Sleep(20 * time.Millisecond)
		return bucket.Info{}, fmt.Errorf("stat %s: %w: injected", key, bucket.ErrUnavailable)
	}
	return f.Bucket.Stat(ctx, key)
}

// TestPresenceStopsAtFirstError: once a HEAD of a presence check fails, the
// rest of the batch is not sent (only those already in flight finish).
func TestPresenceStopsAtFirstError(t *testing.T) {
	const n = 400
	w := newWorld(t, n, func(int) []int { return nil }, size(10))
	fs := &failingStat{Bucket: w.fb}
	u := w.uploader(Options{Bucket: fs})
	u.presence.bucketKeys.Store(1 << 40) // a huge bucket: HEADs, not listings
	if _, err := u.CheckPresence(context.Background(), w.paths); !errors.Is(err, bucket.ErrUnavailable) {
		t.Fatalf("CheckPresence = %v, want the HEAD's error", err)
	}
	if sent := fs.n.Load(); sent > 3+64 {
		t.Fatalf("%d HEADs sent for %d paths after the first failure; want at most the 64 in flight", sent, n)
	}
}

// rejectsConditions is a store that refuses conditional writes outright
// (NotImplemented), as some S3 implementations do.
type rejectsConditions struct{ bucket.Bucket }

func (b *rejectsConditions) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	if opts.IfNoneMatch || opts.IfMatch != "" {
		return bucket.Info{}, fmt.Errorf("put %s: %w: NotImplemented: conditional writes", key, bucket.ErrPermanent)
	}
	return b.Bucket.Put(ctx, key, r, size, opts)
}

// TestStoreRejectingConditionalWrites: with a store that refuses
// If-None-Match outright, uploads still work (looking before writing), the
// probe says so once, and an existing narinfo is not replaced.
func TestStoreRejectingConditionalWrites(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	theirs := []byte("StorePath: " + w.paths[0] + "\nURL: nar/x.nar\nNarHash: sha256:" + strings.Repeat("0", 52) + "\nNarSize: 1\nSig: other-1:xyz\n")
	w.fb.Put(context.Background(), hashFor(0)+".narinfo", bytes.NewReader(theirs), int64(len(theirs)), bucket.PutOptions{})
	w.fb.Put(context.Background(), "nar/x.nar", strings.NewReader("x"), 1, bucket.PutOptions{}) // theirs is complete
	u := w.uploader(Options{Bucket: &rejectsConditions{w.b}})
	res, err := u.Upload(context.Background(), w.paths[2])
	if err != nil || res.Paths != 2 {
		t.Fatalf("Upload = %+v, %v", res, err)
	}
	if u.pub.conditional.Load() != condNo {
		t.Fatal("the probe did not record that the store refuses conditional writes")
	}
	got, _, _ := w.fb.Get(context.Background(), hashFor(0)+".narinfo", 1<<20)
	if !bytes.Equal(got, theirs) {
		t.Fatal("an existing narinfo was replaced")
	}
}

// blockingStat holds HEADs of one key until released.
type blockingStat struct {
	bucket.Bucket
	key     string
	started chan struct{}
	release chan struct{}
}

func (b *blockingStat) Stat(ctx context.Context, key string) (bucket.Info, error) {
	if key == b.key {
		close(b.started)
		<-b.release
	}
	return b.Bucket.Stat(ctx, key)
}

// TestAnswerFromBeforeAResetIsDropped: a presence answer that was in flight
// while the cache was reset is not counted in the new generation (it may
// describe the old bucket).
func TestAnswerFromBeforeAResetIsDropped(t *testing.T) {
	w := newWorld(t, 1, chain, size(10))
	bs := &blockingStat{Bucket: w.fb, key: hashFor(0) + ".narinfo", started: make(chan struct{}), release: make(chan struct{})}
	u := w.uploader(Options{Bucket: bs})
	if _, err := w.fb.Put(context.Background(), hashFor(0)+".narinfo", strings.NewReader("x"), 1, bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := u.CheckPresence(context.Background(), w.paths); done <- err }()
	<-bs.started
	u.Forget() // the reset lands while the HEAD is in flight
	close(bs.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if u.presence.seen(w.paths[0]) {
		t.Fatal("an answer from before the reset was counted in the new generation")
	}
}

// unlistableBucket refuses listings, as a bucket named inside endpoint=
// does.
type unlistableBucket struct{ bucket.Bucket }

func (unlistableBucket) List(context.Context, bucket.ListOptions, func(bucket.Object) error) error {
	return fmt.Errorf("list: %w (NoSuchKey)", bucket.ErrNotExist)
}

// TestUnlistableBucketFallsBackToHEADs: a bucket that cannot be listed with
// this URL is asked about path by path instead; uploads go on.
func TestUnlistableBucketFallsBackToHEADs(t *testing.T) {
	const n = 300 // enough for a listing to be worth it
	w := newWorld(t, n, flat(n), size(10))
	w.b.oldCacheInfo = true // not young: presence may be listed
	u := w.uploader(Options{Bucket: unlistableBucket{w.b}})
	if res, err := u.Upload(context.Background(), w.paths[n-1]); err != nil || res.Paths != n {
		t.Fatalf("Upload = %+v, %v", res, err)
	}
	if !u.presence.unlistable.Load() {
		t.Fatal("the failed listing was not noticed")
	}
}

// noListingBucket cannot list, and says so up front, as an HTTP binary
// cache does; a List call fails the test.
type noListingBucket struct {
	bucket.Bucket
	t *testing.T
}

func (b noListingBucket) NoListing() error {
	return fmt.Errorf("test cache: %w: %w", bucket.ErrPermanent, bucket.ErrNoListing)
}

func (b noListingBucket) List(context.Context, bucket.ListOptions, func(bucket.Object) error) error {
	b.t.Errorf("List called on a bucket that says it cannot list")
	return b.NoListing()
}

// TestNoListingBucketIsAskedByHEAD: a bucket that says it cannot list is
// never listed, however many paths a closure has: presence is asked by
// HEAD, without a failed listing first or a warning about one.
func TestNoListingBucketIsAskedByHEAD(t *testing.T) {
	const n = 300 // enough for a listing to be worth it
	w := newWorld(t, n, flat(n), size(10))
	w.b.oldCacheInfo = true // not young: presence may be listed
	u := w.uploader(Options{Bucket: noListingBucket{w.b, t}})
	if res, err := u.Upload(context.Background(), w.paths[n-1]); err != nil || res.Paths != n {
		t.Fatalf("Upload = %+v, %v", res, err)
	}
	if u.presence.unlistable.Load() {
		t.Fatal("a listing was tried and failed")
	}
}

// TestLoadedPresenceKeepsItsAge: what a restart loads is trusted for what
// is left of the TTL, not for a whole TTL again.
func TestLoadedPresenceKeepsItsAge(t *testing.T) {
	w := newWorld(t, 2, chain, size(100))
	ps := &memPresence{recs: map[string]map[string]time.Time{}}
	u := w.uploader(Options{Presence: ps})
	ctx := context.Background()
	if _, err := u.Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	u.Close()
	recorded := time.Now().Add(-20 * time.Hour)
	for id, recs := range ps.recs {
		for h := range recs {
			ps.recs[id][h] = recorded
		}
	}
	u2 := w.uploader(Options{Presence: ps})
	if err := u2.EnsureCacheInfo(ctx); err != nil {
		t.Fatal(err)
	}
	h := storepath.HashPart(w.paths[0])
	u2.presence.mu.Lock()
	at, ok := u2.presence.known[h]
	u2.presence.mu.Unlock()
	if !ok || at != recorded.Unix() {
		t.Fatalf("loaded %v at %v, want it dated %v", ok, time.Unix(at, 0), recorded)
	}
}

// TestYoungCacheListsThenConfirmsByHEAD: in a young cache many paths are
// asked about with a listing per hash prefix, and only what the listing
// shows is asked again by HEAD (a lagging listing may still show what a
// reset deleted); what it does not show is uploaded.
func TestYoungCacheListsThenConfirmsByHEAD(t *testing.T) {
	const n, present = 400, 50
	w := newWorld(t, n, flat(n), size(10))
	first := w.uploader(Options{})
	for i := 0; i < present; i++ {
		if _, err := first.Upload(context.Background(), w.paths[i]); err != nil {
			t.Fatal(err)
		}
	}
	w.b.stats.Store(0)
	w.b.lists.Store(0)
	fresh := w.uploader(Options{})
	if err := fresh.EnsureCacheInfo(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !fresh.presence.young(time.Now(), youngCache) {
		t.Fatal("the cache is not young")
	}
	res, err := fresh.Upload(context.Background(), w.paths[n-1])
	if err != nil || res.Paths != n-present {
		t.Fatalf("Upload = %+v, %v; want %d paths uploaded", res, err, n-present)
	}
	// The present paths' narinfos are asked about again by HEAD (and, in a
	// young cache, their NARs checked): about 2 × present, far from n.
	if s, l := w.b.stats.Load(), w.b.lists.Load(); l == 0 || l > 32 || s > 3*present {
		t.Fatalf("%d HEADs, %d listings; want at most 32 listings and HEADs only for the %d listed paths", s, l, present)
	}
}

// ghostListingBucket is a bucket whose listing lags behind a reset: it
// still shows narinfos the bucket no longer holds. It records the keys
// asked about by HEAD.
type ghostListingBucket struct {
	bucket.Bucket
	ghosts  map[string]bool // narinfo keys listed but absent
	mu      sync.Mutex
	statted map[string]int
}

func (b *ghostListingBucket) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	if err := b.Bucket.List(ctx, opts, fn); err != nil {
		return err
	}
	for k := range b.ghosts {
		if strings.HasPrefix(k, opts.Prefix) {
			if err := fn(bucket.Object{Key: k}); err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *ghostListingBucket) Stat(ctx context.Context, key string) (bucket.Info, error) {
	b.mu.Lock()
	b.statted[key]++
	b.mu.Unlock()
	return b.Bucket.Stat(ctx, key)
}

// TestYoungCacheLaggingListingIsConfirmed: in a young cache a listing that
// still shows narinfos a reset deleted does not make their paths count as
// present: each listed narinfo is asked about by HEAD, the paths are
// uploaded again, and the closure is whole.
func TestYoungCacheLaggingListingIsConfirmed(t *testing.T) {
	const n, ghosts = 300, 40
	w := newWorld(t, n, flat(n), size(10))
	gb := &ghostListingBucket{Bucket: w.b, ghosts: map[string]bool{}, statted: map[string]int{}}
	for _, p := range w.paths[:ghosts] {
		gb.ghosts[storepath.HashPart(p)+".narinfo"] = true
	}
	u := w.uploader(Options{Bucket: gb})
	ctx := context.Background()
	if err := u.EnsureCacheInfo(ctx); err != nil {
		t.Fatal(err)
	}
	if !u.presence.young(time.Now(), youngCache) {
		t.Fatal("the cache is not young")
	}
	res, err := u.Upload(ctx, w.paths[n-1])
	if err != nil || res.Paths != n {
		t.Fatalf("Upload = %+v, %v; want all %d paths uploaded", res, err, n)
	}
	if w.b.lists.Load() == 0 {
		t.Fatal("presence was not asked by listing")
	}
	gb.mu.Lock()
	defer gb.mu.Unlock()
	for k := range gb.ghosts {
		if gb.statted[k] == 0 {
			t.Fatalf("%s was listed in a young cache and taken as present without a HEAD", k)
		}
		if _, err := w.b.Stat(ctx, k); err != nil {
			t.Fatalf("%s is missing after the upload: %v", k, err)
		}
	}
}
