package uploader

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/nixstore"
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
	end, err := u.resuming.exclusive(context.Background(), f.path(3))
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
	if _, err := w.fb.Put(ctx, key, strings.NewReader(broken), int64(len(broken)), bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	u := w.uploader(Options{})
	u.presence.mu.Lock()
	for i := 0; i < maxUnsure; i++ { // earlier doubts, e.g. after many resets
		u.presence.unsure[fmt.Sprintf("%032d", i)] = true
	}
	u.presence.mu.Unlock()
	if _, err := u.Upload(ctx, w.paths[2]); err != nil {
		t.Fatal(err)
	}
	data, _, _ = w.fb.Get(ctx, key, 1<<20)
	ni, _ = cachefmt.ParseNarInfo(data)
	if _, err := w.fb.Stat(ctx, ni.URL); err != nil {
		t.Fatalf("p2 acknowledged, but p0's narinfo names %s, which is not there: %v", ni.URL, err)
	}
}
