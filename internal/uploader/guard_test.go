package uploader

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/limit"
)

// fakeGuard refuses the keys in refuse and calls the keys in doomed
// announced; it records every Check.
type fakeGuard struct {
	mu     sync.Mutex
	refuse map[string]bool
	doomed map[string]bool
	calls  [][]string
	within time.Duration // what Check allows (default a minute)
}

var errRefused = errors.New("about to be deleted")

func (g *fakeGuard) Check(_ context.Context, relied []string) (time.Duration, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.calls = append(g.calls, slices.Clone(relied))
	for _, k := range relied {
		if g.refuse[k] {
			return 0, errRefused
		}
	}
	if g.within == 0 {
		return time.Minute, nil
	}
	return g.within, nil
}

func (g *fakeGuard) Doomed(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.doomed[key]
}

func (g *fakeGuard) checked(nar string) []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, c := range g.calls {
		if c[0] == nar {
			return c
		}
	}
	return nil
}

// TestGuardCheckedBeforeEveryNarinfo: each narinfo write is preceded by a
// Check naming its NAR and its references' narinfos; a refusal writes no
// narinfo above it and is not a permanent error.
func TestGuardCheckedBeforeEveryNarinfo(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}, 2: {0, 1, 2}})
	g := &fakeGuard{}
	u := f.uploader(t, Options{Guard: g})
	if _, err := u.Upload(context.Background(), f.path(2)); err != nil {
		t.Fatal(err)
	}
	c := g.checked(f.narinfo(t, 2).URL)
	want := []string{f.narinfo(t, 2).URL, hashes[0] + ".narinfo", hashes[1] + ".narinfo"}
	if !slices.Equal(c, want) {
		t.Fatalf("Check for p2 = %v, want %v", c, want)
	}
	if len(g.calls) != 3 {
		t.Fatalf("%d Checks for 3 narinfos", len(g.calls))
	}

	f2 := newFixture(t, map[int][]int{1: {0}})
	g2 := &fakeGuard{refuse: map[string]bool{hashes[0] + ".narinfo": true}}
	u2 := f2.uploader(t, Options{Guard: g2})
	_, err := u2.Upload(context.Background(), f2.path(1))
	if !errors.Is(err, errRefused) || IsPermanent(err) {
		t.Fatalf("Upload with a refused dependency = %v, want the transient refusal", err)
	}
	if f2.rec.index(hashes[1]+".narinfo") >= 0 {
		t.Fatalf("narinfo written above a refused reference: %v", f2.rec.puts)
	}
	// Once the guard allows it, the retry uploads everything.
	g2.mu.Lock()
	g2.refuse = nil
	g2.mu.Unlock()
	if _, err := u2.Upload(context.Background(), f2.path(1)); err != nil {
		t.Fatal(err)
	}
	if f2.rec.index(hashes[1]+".narinfo") < 0 {
		t.Fatal("retry wrote no narinfo")
	}
}

// TestDoomedTopIsRewritten: a top path the presence cache knows, but whose
// narinfo is announced for deletion, is written again (a fresh root).
func TestDoomedTopIsRewritten(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	g := &fakeGuard{doomed: map[string]bool{}}
	u := f.uploader(t, Options{Guard: g})
	ctx := context.Background()
	if _, err := u.Upload(ctx, f.path(1)); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	g.doomed[hashes[1]+".narinfo"] = true
	g.mu.Unlock()
	before := f.rec.count(hashes[1] + ".narinfo")
	if _, err := u.Upload(ctx, f.path(1)); err != nil {
		t.Fatal(err)
	}
	if got := f.rec.count(hashes[1] + ".narinfo"); got != before+1 {
		t.Fatalf("doomed top narinfo written %d more times, want 1", got-before)
	}
	// Its own key was part of the check, as it is announced.
	if c := g.calls[len(g.calls)-1]; !slices.Contains(c, hashes[1]+".narinfo") {
		t.Fatalf("last Check %v lacks the doomed narinfo's own key", c)
	}
}

// TestReviveRewritesSameBytes: presentTop revives a doomed narinfo with
// its own bytes after a Check, and refuses while the guard refuses.
func TestReviveRewritesSameBytes(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	g := &fakeGuard{doomed: map[string]bool{}}
	u := f.uploader(t, Options{Guard: g})
	ctx := context.Background()
	if _, err := u.Upload(ctx, f.path(1)); err != nil {
		t.Fatal(err)
	}
	key := hashes[1] + ".narinfo"
	old, oldInfo, _ := f.rec.Get(ctx, key, 1<<20)
	g.mu.Lock()
	g.doomed[key] = true
	g.refuse = map[string]bool{hashes[0] + ".narinfo": true}
	g.mu.Unlock()
	if _, err := u.pub.presentTop(ctx, f.path(1)); !errors.Is(err, errRefused) {
		t.Fatalf("presentTop while refused = %v", err)
	}
	g.mu.Lock()
	g.refuse = nil
	g.mu.Unlock()
	have, err := u.pub.presentTop(ctx, f.path(1))
	if err != nil || !have {
		t.Fatalf("presentTop = %v, %v", have, err)
	}
	now, nowInfo, _ := f.rec.Get(ctx, key, 1<<20)
	if string(now) != string(old) || nowInfo.ETag == oldInfo.ETag {
		t.Fatalf("revive: same bytes %v, new version %v", string(now) == string(old), nowInfo.ETag != oldInfo.ETag)
	}
}

func TestForgetPaths(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	u := f.uploader(t, Options{})
	if _, err := u.Upload(context.Background(), f.path(1)); err != nil {
		t.Fatal(err)
	}
	u.ForgetPaths([]string{f.path(0)})
	if u.presence.seen(f.path(0)) {
		t.Fatal("p0 still known present")
	}
	if !u.presence.seen(f.path(1)) {
		t.Fatal("p1 forgotten too")
	}
}

// TestLateWriteIsGivenUp: a narinfo write that does not complete in the
// time the guard allowed is given up (a later landing could rely on an
// object a sweep deleted meanwhile); the error is transient.
func TestLateWriteIsGivenUp(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	f.rec.hang = func(key string) bool { return key == hashes[1]+".narinfo" }
	u := f.uploader(t, Options{Guard: &fakeGuard{within: 50 * time.Millisecond}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := u.Upload(ctx, f.path(1))
	if !errors.Is(err, errLate) || IsPermanent(err) || ctx.Err() != nil {
		t.Fatalf("Upload with a hanging narinfo write = %v, want the transient %v well before a minute", err, errLate)
	}
	if f.rec.index(hashes[1]+".narinfo") >= 0 {
		t.Fatal("the late narinfo was written")
	}
}

// TestGuardedWriteSkipsTheWindow: a write the guard allowed goes out at
// once, even when the request window is full (its wait has no bound).
func TestGuardedWriteSkipsTheWindow(t *testing.T) {
	f := newFixture(t, nil)
	l := limit.New(limit.Options{Min: 1, Max: 1})
	c, _ := cacheurl.Parse("file://" + filepath.Join(f.dir, "cache"))
	u, err := New(Options{Bucket: limit.Wrap(f.rec, l), Cache: c, Store: f.store, Keys: []signature.SecretKey{f.key}, TempDir: filepath.Join(f.dir, "tmp")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	ctx := context.Background()
	if err := l.Acquire(ctx); err != nil { // the window is full
		t.Fatal(err)
	}
	defer l.Release(limit.OK, 0, true)
	put := func(key string) func(context.Context, bucket.Bucket) error {
		return func(ctx context.Context, b bucket.Bucket) error {
			_, err := b.Put(ctx, key, strings.NewReader("x"), 1, bucket.PutOptions{})
			return err
		}
	}
	if err := u.pub.guardedWrite(ctx, 5*time.Second, put("guarded")); err != nil {
		t.Fatalf("guarded write with the window full: %v", err)
	}
	// Unguarded writes wait for the window.
	wctx, wcancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer wcancel()
	if err := u.pub.guardedWrite(wctx, 0, put("unguarded")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unguarded write with the window full = %v, want it to wait", err)
	}
}
