package uploader

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
)

type countingStore struct {
	*fakeStore
	closures atomic.Int64
}

func (c *countingStore) Closure(ctx context.Context, p string) ([]*nixstore.PathInfo, error) {
	c.closures.Add(1)
	return c.fakeStore.Closure(ctx, p)
}

// TestNoExtraClosureWalkWhileALargeUploadRuns: while one large upload is
// in flight (its resume record exists and it runs), releasing the resume
// state of a finished job's closure costs no walk of the closure through
// the Nix daemon beyond the one the upload itself made.
func TestNoExtraClosureWalkWhileALargeUploadRuns(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	cs := &countingStore{fakeStore: f.store}
	rs := &memResume{}
	mp := &fakeMultipart{Bucket: f.rec}
	u := f.resumableUploader(t, mp, rs, "zstd")
	u.opt.Store = cs
	// p3's large upload is running: its record exists.
	end, err := u.nars.resuming.exclusive(context.Background(), f.path(3))
	if err != nil {
		t.Fatal(err)
	}
	defer end()
	rs.SaveUpload(f.path(3), []byte(`{}`))
	ctx := context.Background()
	if _, err := u.Upload(ctx, f.path(1)); err != nil {
		t.Fatal(err)
	}
	if n := cs.closures.Load(); n != 1 {
		t.Errorf("first upload walked the closure %d times, want 1", n)
	}
	cs.closures.Store(0)
	if _, err := u.Upload(ctx, f.path(1)); err != nil { // present: fast path
		t.Fatal(err)
	}
	if n := cs.closures.Load(); n > 1 { // the young cache's closure check
		t.Errorf("a present path's job walked its closure %d times (a daemon round trip per path), want at most 1", n)
	}
}

// TestOverflowKeepsTheBrokenPathJustDoubted: the doubt that overflows
// maxUnsure must not drop the paths it was given: the narinfo
// verifyPresent just found broken must still be repaired at its write,
// not kept, and the job not acknowledged with p0's narinfo naming a NAR
// that is not there.
func TestOverflowKeepsTheBrokenPathJustDoubted(t *testing.T) {
	w := newWorld(t, 3, chain, size(100))
	w.breakNarinfo(t)
	u := w.uploader(Options{})
	u.presence.mu.Lock()
	for i := 0; i < maxUnsure; i++ { // earlier doubts, e.g. after many resets
		u.presence.unsure[fmt.Sprintf("%032d", i)] = true
	}
	u.presence.mu.Unlock()
	if _, err := u.Upload(context.Background(), w.paths[2]); err != nil {
		t.Fatal(err)
	}
	w.checkNarinfoComplete(t, 0)
}

// stickyParts holds every PutPart until gate is closed, whatever the
// part's context says: an upload that winds down slowly after its job
// gave it up.
type stickyParts struct {
	*fakeMultipart
	gate    chan struct{}
	started chan struct{}
	once    atomic.Bool
}

func (s *stickyParts) PutPart(ctx context.Context, key, id string, n int, r io.Reader, size int64, sum []byte) (bucket.Part, error) {
	if s.once.CompareAndSwap(false, true) {
		close(s.started)
	}
	<-s.gate
	if err := ctx.Err(); err != nil {
		return bucket.Part{}, err
	}
	return s.fakeMultipart.PutPart(ctx, key, id, n, r, size, sum)
}

// TestAbandonedDependencyUploadReleased: a job gives up while its
// dependency's resumable upload is on its way; another writer then
// uploads the closure; the next push finds it present while the abandoned
// upload is still winding down. Its record, kept file and multipart upload
// must go once it stops: before, the push skipped it as running, and
// nothing released it again.
func TestAbandonedDependencyUploadReleased(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	mp := &fakeMultipart{Bucket: f.rec}
	sp := &stickyParts{fakeMultipart: mp, gate: make(chan struct{}), started: make(chan struct{})}
	rs := &memResume{}
	c, err := cacheurl.Parse("file://" + filepath.Join(f.dir, "cache") + "?compression=none")
	if err != nil {
		t.Fatal(err)
	}
	u, err := New(Options{Bucket: sp, Cache: c, Store: f.store, Keys: []signature.SecretKey{f.key},
		TempDir: filepath.Join(f.dir, "tmp"), Resume: rs, ResumeAbove: 1})
	if err != nil {
		t.Fatal(err)
	}
	var gateOnce sync.Once
	openGate := func() { gateOnce.Do(func() { close(sp.gate) }) }
	t.Cleanup(u.Close)
	t.Cleanup(openGate) // runs first: nothing stays blocked
	ctxA, cancelA := context.WithCancel(context.Background())
	errA := make(chan error, 1)
	go func() { _, err := u.Upload(ctxA, f.path(1)); errA <- err }()
	select {
	case <-sp.started:
	case <-time.After(10 * time.Second):
		t.Fatal("no part was sent")
	}
	cancelA() // the job is given up; the part is still on its way
	if err := <-errA; err == nil {
		t.Fatal("the given-up upload succeeded")
	}
	// Another machine: its own temp directory.
	other, err := New(Options{Bucket: &fakeMultipart{Bucket: f.rec}, Cache: c, Store: f.store, Keys: []signature.SecretKey{f.key},
		TempDir: t.TempDir(), Resume: &memResume{}, ResumeAbove: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(other.Close)
	if _, err := other.Upload(context.Background(), f.path(1)); err != nil {
		t.Fatal(err)
	}
	// The part winds down a moment after the next push began.
	go func() { time.Sleep(100 * time.Millisecond); openGate() }()
	if _, err := u.Upload(context.Background(), f.path(1)); err != nil {
		t.Fatal(err)
	}
	// p1's NAR may have gone up in parts too: one or two uploads aborted.
	aborted := len(mp.abortedKeys())
	if aborted == 0 {
		aborted = 1 // reported by released
	}
	f.released(t, mp, rs, aborted)
}
