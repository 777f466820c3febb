package uploader

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// wipeOnPut empties the bucket right after the first Put of a key with
// suffix completes: a reset of the cache in the middle of an upload.
type wipeOnPut struct {
	bucket.Bucket
	suffix string
	done   atomic.Bool
	wipe   func()
}

func (b *wipeOnPut) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	info, err := b.Bucket.Put(ctx, key, r, size, opts)
	if err == nil && strings.HasSuffix(key, b.suffix) && b.done.CompareAndSwap(false, true) {
		b.wipe()
	}
	return info, err
}

func (w *world) wipe() {
	ctx := context.Background()
	var keys []string
	w.fb.List(ctx, bucket.ListOptions{Recursive: true}, func(o bucket.Object) error { keys = append(keys, o.Key); return nil })
	bucket.DeleteAll(ctx, w.fb, keys)
}

// closureComplete reports whether every narinfo in the bucket has the
// narinfos of its references: what stock Nix needs.
func (w *world) narinfosWithoutReferences() []string {
	var bad []string
	for i, p := range w.paths {
		if !w.has(i) {
			continue
		}
		for _, r := range w.store.infos[p].References {
			if _, err := w.fb.Stat(context.Background(), storepath.HashPart(r)+".narinfo"); err != nil && r != p {
				bad = append(bad, p)
			}
		}
	}
	return bad
}

// TestResetDuringUploadIsNotAcknowledged: the bucket is emptied after the
// middle path's narinfo of a chain is written and before the top's. The
// top's narinfo must not be written on the old generation's strength (its
// reference is gone), the upload must not count as done, and the next
// attempt must leave a complete closure. Before the generation rule
// covered objects the upload itself wrote, the top's narinfo landed in the
// emptied bucket naming a missing reference, and Upload returned nil.
func TestResetDuringUploadIsNotAcknowledged(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	wb := &wipeOnPut{Bucket: w.b, suffix: hashFor(1) + ".narinfo", wipe: w.wipe}
	u := w.uploader(Options{Bucket: wb})
	ctx := context.Background()
	_, err := u.Upload(ctx, w.paths[2])
	if bad := w.narinfosWithoutReferences(); len(bad) > 0 {
		t.Fatalf("narinfos without their references after a reset during the upload: %v", bad)
	}
	if err == nil && !w.has(2) {
		t.Fatal("the upload was acknowledged, but the bucket lacks its path")
	}
	if err == nil {
		t.Fatal("an upload whose cache was reset under it was acknowledged")
	}
	if _, err := u.Upload(ctx, w.paths[2]); err != nil {
		t.Fatalf("retry: %v", err)
	}
	for i := range w.paths {
		if !w.has(i) {
			t.Fatalf("after the retry, p%d is missing", i)
		}
	}
	if _, err := w.fb.Stat(ctx, "nix-cache-info"); err != nil {
		t.Fatalf("nix-cache-info after the retry: %v", err)
	}
}

// TestAcknowledgedFromMemoryAfterReset: a path uploaded a moment ago is
// pushed again after the bucket was emptied. An acknowledgement must mean
// "in the bucket now", to the best of a generation check asked after the
// decision, not a presence answer from before the reset.
func TestAcknowledgedFromMemoryAfterReset(t *testing.T) {
	w := newWorld(t, 2, chain, size(100))
	u := w.uploader(Options{GenerationCheck: time.Hour})
	ctx := context.Background()
	if _, err := u.Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	w.wipe()
	for attempt := 0; attempt < 3; attempt++ {
		_, err := u.Upload(ctx, w.paths[1])
		if err == nil {
			break
		}
	}
	if !w.has(1) || !w.has(0) {
		t.Fatal("acknowledged from memory: the bucket was emptied and the path is not in it")
	}
}

// TestForgetBeforePresenceLoad: a collector's announcement read before the
// presence records on disk are loaded (the bucket was unreachable at
// start) still counts: the paths are not trusted from the old records.
func TestForgetBeforePresenceLoad(t *testing.T) {
	w := newWorld(t, 2, chain, size(100))
	ps := &memPresence{recs: map[string]map[string]time.Time{}}
	u := w.uploader(Options{Presence: ps})
	ctx := context.Background()
	if _, err := u.Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	// A collector deletes p1's narinfo; a restarted agent hears of it
	// before it reaches the bucket.
	if err := w.fb.Delete(ctx, hashFor(1)+".narinfo"); err != nil {
		t.Fatal(err)
	}
	u2 := w.uploader(Options{Presence: ps})
	u2.ForgetPaths([]string{w.paths[1]})
	if err := u2.EnsureCacheInfo(ctx); err != nil {
		t.Fatal(err)
	}
	if u2.presence.has(w.paths[1]) {
		t.Fatal("a path forgotten before the presence records were loaded came back as present")
	}
	if _, err := u2.Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	if !w.has(1) {
		t.Fatal("the forgotten path was acknowledged without an upload")
	}
}

// TestLateAnswerDoesNotReviveForgotten: a presence answer to a question
// sent before a path was forgotten, delivered after, is dropped.
func TestLateAnswerDoesNotReviveForgotten(t *testing.T) {
	w := newWorld(t, 1, chain, size(100))
	u := w.uploader(Options{})
	asked := time.Now()
	u.ForgetPaths([]string{w.paths[0]})
	u.presence.mark([]string{w.paths[0]}, asked)
	if u.presence.seen(w.paths[0]) {
		t.Fatal("an answer asked before the forget marked the path present")
	}
	u.presence.mark([]string{w.paths[0]}, time.Now().Add(time.Millisecond))
	if !u.presence.seen(w.paths[0]) {
		t.Fatal("an answer asked after the forget was dropped")
	}
}

// TestSucceedKeepsTheReplacement: a node nobody waited for any more is
// cancelled and replaced by the next job's node; if the old node's narinfo
// write still completes, its success must not take the replacement out of
// the graph (the replacement would run unseen: a third job would upload
// the path again, and Discard would think no work on it is left).
func TestSucceedKeepsTheReplacement(t *testing.T) {
	w := newWorld(t, 1, chain, size(100))
	u := w.uploader(Options{})
	g := newGraph(graphTasks{nar: u.runNAR, narinfo: u.runNarinfo, large: u.nars.isLarge}, u.presence, 0, 0) // no workers: the test drives the nodes
	defer g.close()
	closure, err := w.store.Closure(context.Background(), w.paths[0])
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{w.paths[0]: true}
	interestA, a, _ := g.plan(&jobResult{}, closure, want, nil, nil, 0)
	g.release(interestA) // the job went away: a is cancelled
	_, b, _ := g.plan(&jobResult{}, closure, want, nil, nil, 0)
	if a == nil || b == nil || a == b {
		t.Fatalf("want a replacement node, got %p and %p", a, b)
	}
	now := time.Now()
	g.succeed(a, now, now, true)
	g.mu.Lock()
	cur := g.nodes[w.paths[0]]
	g.mu.Unlock()
	if cur != b {
		t.Fatal("the old node's success removed its replacement from the graph")
	}
}

// heldStat answers the first Stat of key as it stood when the request
// arrived, but only once released: an answer delayed past a reset.
type heldStat struct {
	bucket.Bucket
	key     string
	arrived chan struct{}
	release chan struct{}
	armed   atomic.Bool
}

func (b *heldStat) Stat(ctx context.Context, key string) (bucket.Info, error) {
	if key != b.key || !b.armed.CompareAndSwap(true, false) {
		return b.Bucket.Stat(ctx, key)
	}
	info, err := b.Bucket.Stat(ctx, key)
	close(b.arrived)
	<-b.release
	return info, err
}

// TestAnswerFromBeforeResetIsNotShared: a job that joins a presence
// question asked before a reset was noticed must not take its answer
// ("present") for the cache as it is now.
func TestAnswerFromBeforeResetIsNotShared(t *testing.T) {
	w := newWorld(t, 1, chain, size(100))
	hb := &heldStat{Bucket: w.b, key: hashFor(0) + ".narinfo", arrived: make(chan struct{}), release: make(chan struct{})}
	u := w.uploader(Options{Bucket: hb})
	ctx := context.Background()
	if _, err := u.Upload(ctx, w.paths[0]); err != nil {
		t.Fatal(err)
	}
	u.presence.reset() // nothing known: the next check asks
	hb.armed.Store(true)
	first := make(chan []string)
	go func() {
		missing, _ := u.CheckPresence(ctx, []string{w.paths[0]})
		first <- missing
	}()
	<-hb.arrived // the HEAD saw the narinfo; its answer is on its way
	w.wipe()
	if err := u.CheckGeneration(ctx); err != nil { // the reset is noticed
		t.Fatal(err)
	}
	joined := make(chan struct{})
	u.presence.joined = func() { close(joined) }
	second := make(chan []string)
	go func() {
		missing, _ := u.CheckPresence(ctx, []string{w.paths[0]})
		second <- missing
	}()
	<-joined // the second check waits for the first one's answer
	close(hb.release)
	<-first
	if missing := <-second; len(missing) != 1 {
		t.Fatal("a presence answer asked before the reset was taken for the cache after it")
	}
}

// TestYoungCacheRepairsNarinfoWithoutNAR: shortly after a reset, a
// dependency's narinfo is there but its NAR is not (written across the
// reset by an agent that crashed before it repaired it). An upload that
// needs it finds that out, uploads the NAR again, and keeps the narinfo;
// the check costs nothing the second time in the same generation.
func TestYoungCacheRepairsNarinfoWithoutNAR(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	ctx := context.Background()
	first := w.uploader(Options{})
	if _, err := first.Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	data, _, err := w.fb.Get(ctx, hashFor(0)+".narinfo", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	ni, err := cachefmt.ParseNarInfo(data)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.fb.Delete(ctx, ni.URL); err != nil { // the NAR went with a reset
		t.Fatal(err)
	}
	// The repaired NAR is slow to write: the upload of p2 (whose narinfo
	// does not wait for p0, a present path's dependency) must still not
	// return before it is up. Before uploads waited for every node they
	// planned, it returned at once and cancelled the repair.
	w.b.failPut = func(key string) error {
		if key == ni.URL {
			time.Sleep(300 * time.Millisecond)
		}
		return nil
	}
	u := w.uploader(Options{})
	if _, err := u.Upload(ctx, w.paths[2]); err != nil {
		t.Fatal(err)
	}
	if _, err := w.fb.Stat(ctx, ni.URL); err != nil {
		t.Fatalf("the missing NAR of p0 is not there when the upload returned: %v", err)
	}
	w.b.failPut = nil
	gets := w.b.gets.Load()
	if _, err := u.Upload(ctx, w.paths[2]); err != nil {
		t.Fatal(err)
	}
	if n := w.b.gets.Load() - gets; n > 2 {
		t.Fatalf("the second upload in the same generation read %d objects; the closure was verified already", n)
	}
}

// TestUnsureIsBounded: paths doubted beyond maxUnsure are not remembered
// one by one; from then on every present narinfo is checked as in a young
// cache, however old the cache is.
func TestUnsureIsBounded(t *testing.T) {
	w := newWorld(t, 1, chain, size(100))
	u := w.uploader(Options{})
	old := time.Now().Add(-24 * time.Hour)
	u.gen.setBorn(old)
	if u.presence.young(time.Now(), youngCache) {
		t.Fatal("a day-old cache counts as young")
	}
	batch := make([]string, 0, 1000)
	for i := 0; i <= maxUnsure; i++ {
		batch = append(batch, fmt.Sprintf("/nix/store/%032d-p", i))
		if len(batch) == cap(batch) || i == maxUnsure {
			u.presence.doubt(batch)
			batch = batch[:0]
		}
	}
	u.presence.mu.Lock()
	n := len(u.presence.unsure)
	u.presence.mu.Unlock()
	if n > maxUnsure {
		t.Fatalf("%d unsure paths remembered, bound %d", n, maxUnsure)
	}
	if !u.presence.young(time.Now(), youngCache) {
		t.Fatal("after the unsure set overflowed, present narinfos are trusted without checks")
	}
}

// TestYoungCacheReplacesNarinfoNamingAnotherNAR: a dependency's narinfo
// names a NAR that is not there and that this uploader would not write
// (another compression, say): uploading the NAR again does not repair it,
// so the broken narinfo is replaced, although narinfo writes are
// create-only. A complete narinfo is never replaced (the other tests).
func TestYoungCacheReplacesNarinfoNamingAnotherNAR(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	w.breakNarinfo(t)
	u := w.uploader(Options{})
	if _, err := u.Upload(context.Background(), w.paths[2]); err != nil {
		t.Fatal(err)
	}
	w.checkNarinfoComplete(t, 0)
}

// breakNarinfo uploads p1 (and so p0), then makes p0's narinfo name a NAR
// that is not there, of another compression than this uploader's.
func (w *world) breakNarinfo(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if _, err := w.uploader(Options{}).Upload(ctx, w.paths[1]); err != nil {
		t.Fatal(err)
	}
	key := hashFor(0) + ".narinfo"
	data, _, err := w.fb.Get(ctx, key, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	ni, err := cachefmt.ParseNarInfo(data)
	if err != nil {
		t.Fatal(err)
	}
	broken := strings.Replace(strings.Replace(string(data), "URL: "+ni.URL, "URL: nar/"+strings.Repeat("0", 52)+".nar.xz", 1),
		"Compression: zstd", "Compression: xz", 1)
	if broken == string(data) {
		t.Fatal("the narinfo could not be edited")
	}
	if _, err := w.fb.Put(ctx, key, strings.NewReader(broken), int64(len(broken)), bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
}

// checkNarinfoComplete fails t unless path i's narinfo names a NAR that
// is there.
func (w *world) checkNarinfoComplete(t *testing.T, i int) {
	t.Helper()
	ctx := context.Background()
	data, _, err := w.fb.Get(ctx, hashFor(i)+".narinfo", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	ni, err := cachefmt.ParseNarInfo(data)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.fb.Stat(ctx, ni.URL); err != nil {
		t.Fatalf("p%d's narinfo names %s, which is not there: %v", i, ni.URL, err)
	}
}

// holdAfterPut writes key, then holds the Put's return until release is
// closed: the object is in the bucket, its writer has not heard yet.
type holdAfterPut struct {
	bucket.Bucket
	key     string
	entered chan struct{}
	release chan struct{}
	once    atomic.Bool
}

func (b *holdAfterPut) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	info, err := b.Bucket.Put(ctx, key, r, size, opts)
	if err == nil && key == b.key && b.once.CompareAndSwap(false, true) {
		close(b.entered)
		<-b.release
	}
	return info, err
}

// TestNodeOfAnEarlierGenerationIsNotShared: a job planned after a reset
// must not wait for (and count on) a node planned before it. Here p0's
// narinfo is written just before the bucket is emptied, and its node
// completes only after a second job, planned in the new generation, needs
// p0: that job must upload p0 again rather than take the old node's
// success for it. Before nodes carried their generation into sharing, p1
// was acknowledged with p0 missing from the bucket.
func TestNodeOfAnEarlierGenerationIsNotShared(t *testing.T) {
	w := newWorld(t, 2, chain, size(100))
	ctx := context.Background()
	hold := &holdAfterPut{Bucket: w.b, key: hashFor(0) + ".narinfo", entered: make(chan struct{}), release: make(chan struct{})}
	u := w.uploader(Options{Bucket: hold, GenerationCheck: time.Nanosecond})
	first := make(chan error, 1)
	go func() { _, err := u.Upload(ctx, w.paths[0]); first <- err }()
	select {
	case <-hold.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("p0's narinfo was not written")
	}
	w.wipe() // p0's narinfo goes with the reset; its node has not finished
	var secondErr error
	secondDone := make(chan struct{})
	go func() { _, secondErr = u.Upload(ctx, w.paths[1]); close(secondDone) }()
	// Let the second job plan (and, before the fix, join p0's old node,
	// waiting for it), or finish; then let the old node finish.
	deadline := time.Now().Add(10 * time.Second)
	for planned := false; !planned && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		u.graph.mu.Lock()
		planned = u.graph.nodes[w.paths[1]] != nil
		u.graph.mu.Unlock()
		select {
		case <-secondDone:
			planned = true
		default:
		}
	}
	close(hold.release)
	if err := <-first; err == nil {
		t.Error("the upload across the reset was acknowledged")
	}
	<-secondDone
	if secondErr != nil {
		t.Fatalf("upload of p1 after the reset: %v", secondErr)
	}
	if !w.has(1) {
		t.Fatal("p1 was acknowledged but is not in the bucket")
	}
	if bad := w.narinfosWithoutReferences(); len(bad) > 0 {
		t.Fatalf("acknowledged p1, but narinfos lack their references: %v", bad)
	}
}

// TestConcurrentStartWritesCacheInfoOnce: workers starting at once on an
// empty bucket share one look at nix-cache-info and one write of it.
func TestConcurrentStartWritesCacheInfoOnce(t *testing.T) {
	w := newWorld(t, 8, func(int) []int { return nil }, size(10))
	var writes atomic.Int64
	w.b.failPut = func(key string) error {
		if key == "nix-cache-info" {
			writes.Add(1)
			time.Sleep(50 * time.Millisecond) // a slow write: the others arrive meanwhile
		}
		return nil
	}
	u := w.uploader(Options{})
	errs := make(chan error, len(w.paths))
	for _, p := range w.paths {
		go func() { _, err := u.Upload(context.Background(), p); errs <- err }()
	}
	for range w.paths {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := writes.Load(); n != 1 {
		t.Fatalf("nix-cache-info written %d times by one uploader, want 1", n)
	}
}
