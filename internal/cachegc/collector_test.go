package cachegc

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/nixspool/nixspool/internal/bucket"
)

// world is a bucket, its clock and a collector's options.
type world struct {
	t     *testing.T
	ctx   context.Context
	clock *fakeClock
	b     *memBucket
}

func newWorld(t *testing.T) *world {
	c := newFakeClock()
	return &world{t: t, ctx: context.Background(), clock: c, b: newMemBucket(t, c)}
}

func (w *world) opts() Options {
	return Options{KeepSince: time.Hour, Grace: 10 * time.Minute, Clock: w.clock, Agent: "collector-1", Host: "test", LeaseTTL: 5 * time.Minute}
}

func (w *world) upload(g *Watcher, name string, refs ...string) {
	w.t.Helper()
	if err := upload(w.ctx, w.b, g, name, refs...); err != nil {
		w.t.Fatalf("upload %s: %v", name, err)
	}
}

func (w *world) put(key, body string) {
	w.t.Helper()
	if _, err := w.b.Put(w.ctx, key, strings.NewReader(body), int64(len(body)), bucket.PutOptions{}); err != nil {
		w.t.Fatal(err)
	}
}

func (w *world) run(opt Options) *Report {
	w.t.Helper()
	rep, err := Run(w.ctx, w.b, opt)
	if err != nil {
		w.t.Fatalf("gc: %v", err)
	}
	return rep
}

func (w *world) watcher() *Watcher {
	return NewWatcher(WatcherOptions{Bucket: w.b, Clock: w.clock, Poll: 10 * time.Second})
}

func (w *world) present(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if !w.b.has(hashOf(n)+".narinfo") || !w.b.has(narKey(n)) {
			t.Errorf("%s was deleted", n)
		}
	}
}

func (w *world) gone(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		for _, k := range []string{hashOf(n) + ".narinfo", narKey(n), hashOf(n) + ".ls", "log/" + hashOf("drv "+n) + "-" + n + ".drv"} {
			if w.b.has(k) {
				t.Errorf("%s of %s is still there", k, n)
			}
		}
	}
}

// oldAndNew writes a cache with old paths (two hours old), some reachable
// from a recent one or a pin, and orphan NARs old and young.
func oldAndNew(w *world) {
	w.put("nix-cache-info", "StoreDir: /nix/store\n")
	w.upload(nil, "a")
	w.upload(nil, "b", "a")
	w.upload(nil, "c", "b")
	w.upload(nil, "d")
	w.upload(nil, "f")
	w.upload(nil, "g", "f")
	w.put("nar/orphan-old.nar.zst", "orphan")
	if err := WritePin(w.ctx, w.b, "release-1", pathOf("g")); err != nil {
		w.t.Fatal(err)
	}
	w.clock.Advance(2 * time.Hour)
	w.upload(nil, "e", "d")
	w.put("nar/orphan-young.nar.zst", "orphan")
}

func TestCollectOldUnreachable(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	rep := w.run(w.opts())
	w.b.checkInvariant(t)
	w.gone(t, "a", "b", "c")
	w.present(t, "d", "e", "f", "g")
	if w.b.has("nar/orphan-old.nar.zst") || !w.b.has("nar/orphan-young.nar.zst") || !w.b.has("nix-cache-info") || !w.b.has(PinPrefix+"release-1") {
		t.Errorf("orphans, nix-cache-info or the pin handled wrongly: %v", w.b.keys())
	}
	if rep.Deleted.Narinfos != 3 || rep.Deleted.NARs != 4 || rep.Deleted.Others != 6 || !rep.Complete || rep.Roots != 1 || rep.Pins != 1 || rep.Live != 4 {
		t.Errorf("report %+v", rep)
	}
	if rep.Cycle == "" || !w.b.has(announceKey(rep.Cycle)) || !w.b.has(doneKey(rep.Cycle)) {
		t.Errorf("cycle %q: announcement or done marker missing: %v", rep.Cycle, w.b.keys())
	}
	want := []string{pathOf("a"), pathOf("b"), pathOf("c")}
	slices.Sort(want)
	if !slices.Equal(rep.Paths, want) {
		t.Errorf("report paths %v, want %v", rep.Paths, want)
	}
	// The lease was released: another collector may start at once.
	if _, err := Run(w.ctx, w.b, Options{KeepSince: time.Hour, Grace: time.Minute, Clock: w.clock, Agent: "collector-2", Host: "other"}); err != nil {
		t.Fatalf("second collector after a released lease: %v", err)
	}
}

func TestDryRunMatchesRun(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	before := w.b.keys()
	puts := w.b.puts
	opt := w.opts()
	opt.DryRun = true
	dry := w.run(opt)
	if after := w.b.keys(); !slices.Equal(before, after) {
		t.Fatalf("dry run changed the bucket:\nbefore %v\nafter  %v", before, after)
	}
	if w.b.puts != puts || w.b.deletes != 0 {
		t.Fatalf("dry run wrote %d and deleted %d objects", w.b.puts-puts, w.b.deletes)
	}
	real := w.run(w.opts())
	if !slices.Equal(dry.Keys, real.Keys) || len(dry.Keys) != 13 || !slices.Equal(dry.Paths, real.Paths) {
		t.Fatalf("dry run would delete\n%v\nthe run deleted\n%v", dry.Keys, real.Keys)
	}
	if dry.Doomed != real.Deleted {
		t.Fatalf("dry run counts %+v, run counts %+v", dry.Doomed, real.Deleted)
	}
}

// TestSecondRunReadsNothing: with the reference cache, a run over a bucket
// that did not change reads no narinfo.
func TestSecondRunReadsNothing(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	cache, err := OpenRefCache(filepath.Join(t.TempDir(), "gc.db"), w.b.String())
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	opt := w.opts()
	opt.Cache = cache
	first := w.run(opt)
	if first.Requests.Get == 0 || w.b.narinfoGets() == 0 {
		t.Fatalf("first run read nothing: %+v", first.Requests)
	}
	gets := w.b.narinfoGets()
	second := w.run(opt)
	if n := w.b.narinfoGets() - gets; n != 0 {
		t.Fatalf("second run read %d narinfos", n)
	}
	if second.Deleted.Objects() != 0 || second.Cycle != "" {
		t.Fatalf("second run deleted %+v (cycle %q)", second.Deleted, second.Cycle)
	}
	// The cache forgot what the first run deleted: it holds the four
	// narinfos left (d, e, f, g) and the pin.
	entries := 0
	cache.db.View(func(tx *bolt.Tx) error {
		entries = cache.bucket(tx).Stats().KeyN
		return nil
	})
	if entries != 5 {
		t.Fatalf("reference cache holds %d entries, want 5", entries)
	}
	// One narinfo changes: one read.
	w.upload(nil, "e", "d")
	gets = w.b.narinfoGets()
	w.run(opt)
	if n := w.b.narinfoGets() - gets; n != 1 {
		t.Fatalf("run after one rewrite read %d narinfos, want 1", n)
	}
}

// TestWriteDuringGraceKeepsClosure: an agent that writes, before the
// danger zone, a narinfo relying on doomed paths makes them live again.
func TestWriteDuringGraceKeepsClosure(t *testing.T) {
	for _, skew := range []time.Duration{0, 3 * time.Hour, -3 * time.Hour} {
		t.Run(skew.String(), func(t *testing.T) {
			w := newWorld(t)
			w.b.skew = skew
			oldAndNew(w)
			g := w.watcher()
			opt := w.opts()
			var err error
			opt.afterAnnounce = func() {
				w.clock.at(w.clock.Now().Add(opt.Grace/2), func() {
					if perr := g.Poll(w.ctx); perr != nil {
						t.Error(perr)
					}
					if !g.Doomed(hashOf("b") + ".narinfo") {
						t.Error("b is not announced")
					}
					err = upload(w.ctx, w.b, g, "n", "b")
				})
			}
			rep := w.run(opt)
			if err != nil {
				t.Fatalf("upload before the danger zone: %v", err)
			}
			w.b.checkInvariant(t)
			w.present(t, "a", "b", "n")
			w.gone(t, "c")
			if rep.Revived != 2 {
				t.Errorf("revived %d, want 2 (a and b)", rep.Revived)
			}
		})
	}
}

// TestWriteInDangerZoneRefused: in the danger zone the agent is refused;
// after the sweep the deleted reference is reported gone, and uploading
// it again works.
func TestWriteInDangerZoneRefused(t *testing.T) {
	for _, skew := range []time.Duration{0, 3 * time.Hour, -3 * time.Hour} {
		t.Run(skew.String(), func(t *testing.T) {
			w := newWorld(t)
			w.b.skew = skew
			oldAndNew(w)
			g := w.watcher()
			opt := w.opts()
			tm := TimingFor(opt.Grace)
			var early, late error
			opt.afterAnnounce = func() {
				now := w.clock.Now()
				w.clock.at(now.Add(time.Second), func() { g.Poll(w.ctx) })
				// Well before the danger zone it is fine to rely on b...
				w.clock.at(now.Add(tm.Grace-tm.Margin-3*clockSlack), func() {
					g.Poll(w.ctx)
					_, early = g.Check(w.ctx, []string{hashOf("a") + ".narinfo"})
				})
				// ...but not in it.
				w.clock.at(now.Add(tm.Grace-tm.Margin/2), func() { late = upload(w.ctx, w.b, g, "n", "b") })
			}
			w.run(opt)
			if early != nil {
				t.Errorf("check before the danger zone: %v", early)
			}
			if !errors.Is(late, ErrCollecting) {
				t.Fatalf("upload in the danger zone = %v, want a refusal", late)
			}
			w.gone(t, "a", "b", "c")
			w.b.checkInvariant(t)
			// The sweep is over; the watcher learns it, and the retry
			// finds b gone.
			g.Poll(w.ctx)
			var ce *CollectingError
			if err := upload(w.ctx, w.b, g, "n", "b"); !errors.As(err, &ce) || !ce.Gone {
				t.Fatalf("upload relying on deleted b = %v, want gone", err)
			}
			// Uploading the closure again works.
			w.upload(g, "a")
			w.upload(g, "b", "a")
			w.upload(g, "n", "b")
			w.b.checkInvariant(t)
		})
	}
}

// killable is a bucket whose requests fail once the "process" is dead.
type killable struct {
	bucket.Bucket
	dead bool
}

var errDead = errors.New("process killed")

func (k *killable) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	if k.dead {
		return bucket.Info{}, errDead
	}
	return k.Bucket.Put(ctx, key, r, size, opts)
}

func (k *killable) DeleteMany(ctx context.Context, keys []string) error {
	if k.dead {
		return errDead
	}
	return k.Bucket.(bucket.BatchDeleter).DeleteMany(ctx, keys)
}

func (k *killable) Now() time.Time { return bucket.Now(k.Bucket) }

// TestCollectorKilledBetweenLayers: a collector that dies between two
// delete requests leaves a consistent cache and an announcement that
// lapses; agents hold back until then, and the next collector takes the
// lease over once it expired and finishes the job.
func TestCollectorKilledBetweenLayers(t *testing.T) {
	w := newWorld(t)
	w.upload(nil, "a")
	w.upload(nil, "b", "a")
	w.upload(nil, "c", "b")
	w.upload(nil, "d", "c")
	w.clock.Advance(2 * time.Hour)
	g := w.watcher()
	kb := &killable{Bucket: w.b}
	opt := w.opts()
	layers := 0
	opt.beforeDelete = func(what string, keys []string) {
		if strings.HasPrefix(what, "narinfos") {
			layers++
			if layers == 3 {
				kb.dead = true // dies before the third layer
			}
		}
	}
	opt.afterAnnounce = func() { g.Poll(w.ctx) }
	rep, err := Run(w.ctx, kb, opt)
	if err == nil {
		t.Fatalf("killed collector reported success: %+v", rep)
	}
	w.b.checkInvariant(t)
	if w.b.has(hashOf("d")+".narinfo") || w.b.has(hashOf("c")+".narinfo") || !w.b.has(hashOf("b")+".narinfo") {
		t.Fatalf("expected d and c deleted, b kept: %v", w.b.keys())
	}
	if w.b.has(doneKey(rep.Cycle)) {
		t.Fatal("a dead collector wrote its done marker")
	}
	// Agents still hold back: the announcement has not lapsed.
	g.Poll(w.ctx)
	if err := upload(w.ctx, w.b, g, "n", "b"); !errors.Is(err, ErrCollecting) {
		t.Fatalf("upload relying on b while the dead cycle's window is open = %v", err)
	}
	// Another collector must wait for the lease.
	opt2 := w.opts()
	opt2.Agent, opt2.Host = "collector-2", "other"
	if _, err := Run(w.ctx, w.b, opt2); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("second collector while the lease is held = %v", err)
	}
	tm := TimingFor(opt.Grace)
	w.clock.Advance(tm.Grace + tm.Window + tm.Margin)
	g.Poll(w.ctx)
	if g.Doomed(hashOf("b") + ".narinfo") {
		t.Fatal("b still doomed after the window")
	}
	// After the window, b is confirmed present and may be relied on.
	if err := upload(w.ctx, w.b, g, "n", "b"); err != nil {
		t.Fatalf("upload after the window: %v", err)
	}
	w.clock.Advance(2 * time.Hour)
	rep2 := w.run(opt2)
	w.b.checkInvariant(t)
	w.gone(t, "a", "b", "n")
	if rep2.Deleted.Narinfos != 3 {
		t.Errorf("second cycle deleted %d narinfos, want a, b and n", rep2.Deleted.Narinfos)
	}
}

// TestWindowOver: a sweep that runs out of its window stops deleting,
// retires the cycle and reports it.
func TestWindowOver(t *testing.T) {
	w := newWorld(t)
	w.upload(nil, "a")
	w.upload(nil, "b", "a")
	w.clock.Advance(2 * time.Hour)
	opt := w.opts()
	opt.beforeDelete = func(what string, keys []string) {
		if what == "narinfos layer 1" {
			w.clock.Advance(opt.Grace * 3) // a very slow sweep
		}
	}
	rep, err := Run(w.ctx, w.b, opt)
	if !errors.Is(err, ErrWindowOver) || rep.Complete {
		t.Fatalf("Run = %v, complete %v; want the window to end it", err, rep.Complete)
	}
	w.b.checkInvariant(t)
	var d Done
	if _, err := getJSON(w.ctx, w.b, doneKey(rep.Cycle), &d); err != nil || d.Complete {
		t.Fatalf("done marker %+v, %v", d, err)
	}
}

func TestLease(t *testing.T) {
	w := newWorld(t)
	rec := func(agent, host string) leaseRecord {
		return leaseRecord{Holder: agent + "/1", Agent: agent, Host: host, TTL: time.Minute}
	}
	l1, err := acquireLease(w.ctx, w.b, w.clock, rec("a", "h1"), true)
	if err != nil {
		t.Fatal(err)
	}
	var held *LeaseHeldError
	if _, err := acquireLease(w.ctx, w.b, w.clock, rec("b", "h2"), true); !errors.As(err, &held) || held.Holder != "a" {
		t.Fatalf("second acquire = %v", err)
	}
	// The same agent (a restarted process) takes it over at once.
	l1b, err := acquireLease(w.ctx, w.b, w.clock, leaseRecord{Holder: "a/2", Agent: "a", Host: "h1", TTL: time.Minute}, true)
	if err != nil {
		t.Fatalf("same agent after a restart: %v", err)
	}
	if err := l1.renew(w.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("renew by the dead process = %v, want lost", err)
	}
	// Expired: taken over.
	w.clock.Advance(time.Minute + 2*clockSlack)
	l2, err := acquireLease(w.ctx, w.b, w.clock, rec("b", "h2"), true)
	if err != nil {
		t.Fatalf("acquire after expiry: %v", err)
	}
	if err := l1b.renew(w.ctx); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("renew after take-over = %v", err)
	}
	// Released: taken at once.
	if err := l2.release(w.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := acquireLease(w.ctx, w.b, w.clock, rec("c", "h3"), true); err != nil {
		t.Fatalf("acquire after release: %v", err)
	}
	// A renewal has new bytes: an IfMatch with the ETag read before it
	// fails.
	_, info, _ := w.b.Get(w.ctx, LeaseKey, 1<<20)
	l3 := &lease{b: w.b, clock: w.clock, rec: rec("c", "h3"), etag: info.ETag, conditional: true}
	if err := l3.renew(w.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := w.b.Put(w.ctx, LeaseKey, strings.NewReader("x"), 1, bucket.PutOptions{IfMatch: info.ETag}); !bucket.IsPrecondition(err) {
		t.Fatalf("take-over with a stale ETag = %v", err)
	}
}

// TestWithoutConditionalWrites: on a store that ignores conditions the
// collector still works, says it is best effort, and refuses a lease it
// can read as held.
func TestWithoutConditionalWrites(t *testing.T) {
	w := newWorld(t)
	w.b.ignoreConditions = true
	oldAndNew(w)
	rep := w.run(w.opts())
	if len(rep.Warnings) == 0 || !strings.Contains(rep.Warnings[0], "best effort") {
		t.Errorf("warnings %v", rep.Warnings)
	}
	w.gone(t, "a", "b", "c")
	l, err := acquireLease(w.ctx, w.b, w.clock, leaseRecord{Holder: "x/1", Agent: "x", Host: "hx", TTL: time.Hour}, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := acquireLease(w.ctx, w.b, w.clock, leaseRecord{Holder: "y/1", Agent: "y", Host: "hy", TTL: time.Hour}, false); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("second lease = %v", err)
	}
	_ = l
}

func TestGraceTooShortForAWatcher(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	g := NewWatcher(WatcherOptions{Bucket: w.b, Clock: w.clock, Poll: time.Minute, ID: "agent-7", Host: "builder-7"})
	if err := g.register(w.ctx); err != nil {
		t.Fatal(err)
	}
	opt := w.opts()
	opt.Grace = time.Minute
	_, err := Run(w.ctx, w.b, opt)
	var short *GraceTooShortError
	if !errors.As(err, &short) || short.Host != "builder-7" || short.MinGrace <= 2*time.Minute {
		t.Fatalf("Run = %v, want a refusal naming builder-7", err)
	}
	if tm := TimingFor(short.MinGrace); tm.Grace-tm.Margin < 2*time.Minute+clockSlack {
		t.Fatalf("suggested grace %s is still too short", short.MinGrace)
	}
	w.gone(t) // nothing happened
	w.present(t, "a", "b", "c")
	opt.Grace = short.MinGrace
	w.run(opt)
	w.gone(t, "a", "b", "c")
}

// TestRealisations: a realisation refers to its output; an old one of a
// doomed output goes first, a recent one keeps its output.
func TestRealisations(t *testing.T) {
	w := newWorld(t)
	w.upload(nil, "x")
	w.upload(nil, "y")
	w.put("realisations/sha256:aaa!out.doi", `{"id":"sha256:aaa!out","outPath":"`+hashOf("x")+`-x","signatures":[]}`)
	w.clock.Advance(2 * time.Hour)
	w.put("realisations/sha256:bbb!out.doi", `{"id":"sha256:bbb!out","outPath":"`+hashOf("y")+`-y","signatures":[]}`)
	var order []string
	opt := w.opts()
	opt.beforeDelete = func(what string, keys []string) { order = append(order, what) }
	w.run(opt)
	w.gone(t, "x")
	w.present(t, "y")
	if w.b.has("realisations/sha256:aaa!out.doi") || !w.b.has("realisations/sha256:bbb!out.doi") {
		t.Fatalf("realisations: %v", w.b.keys())
	}
	if len(order) < 2 || order[0] != "realisations" {
		t.Fatalf("delete order %v: realisations must go before their outputs", order)
	}
}

// TestAbandonedUploadsAborted: multipart uploads older than UploadAge are
// aborted; younger ones may be another agent's, still running.
func TestAbandonedUploadsAborted(t *testing.T) {
	w := newWorld(t)
	ub := &uploadsBucket{memBucket: w.b}
	now := w.b.Now()
	ub.ups = []bucket.Upload{
		{Key: "nar/old.nar.zst", UploadID: "old", Initiated: now.Add(-48 * time.Hour)},
		{Key: "nar/young.nar.zst", UploadID: "young", Initiated: now.Add(-time.Hour)},
	}
	opt := w.opts()
	opt.DryRun = true
	dry, err := Run(w.ctx, ub, opt)
	if err != nil || dry.Doomed.Uploads != 1 || len(ub.aborted) != 0 {
		t.Fatalf("dry run: %v, %+v, aborted %v", err, dry.Doomed, ub.aborted)
	}
	rep, err := Run(w.ctx, ub, w.opts())
	if err != nil || rep.Deleted.Uploads != 1 || !slices.Equal(ub.aborted, []string{"old"}) {
		t.Fatalf("run: %v, %+v, aborted %v", err, rep.Deleted, ub.aborted)
	}
}

// TestLateVisibleWriteIsFreshRoot: a narinfo (or realisation) whose
// LastModified is before the mark but which became visible only after the
// mark's listing is a fresh root of the sweep: what it refers to stays.
func TestLateVisibleWriteIsFreshRoot(t *testing.T) {
	for _, tc := range []struct{ name, key, body string }{
		{"narinfo", hashOf("m") + ".narinfo", narinfoOf("m", "c")},
		{"realisation", "realisations/sha256:ccc!out.doi", `{"id":"sha256:ccc!out","outPath":"` + hashOf("c") + `-c","signatures":[]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			w.b.checkWrites = true
			oldAndNew(w) // a, b, c are old and unreachable
			// An agent's write begins in one second and lands in the
			// next, after the collector (starting in that next second)
			// listed the bucket for its mark.
			w.clock.Advance(900 * time.Millisecond)
			w.put(narKey("m"), "NAR of m")
			land := w.b.beginPut(tc.key, tc.body)
			w.clock.Advance(200 * time.Millisecond)
			w.clock.at(w.clock.Now().Add(100*time.Millisecond), land)
			rep := w.run(w.opts())
			if !w.b.has(tc.key) {
				t.Fatalf("%s never landed", tc.key)
			}
			if info, _ := w.b.Stat(w.ctx, tc.key); !rep.MarkTime.After(info.LastModified) {
				t.Fatalf("mark time %v is not after the write's LastModified %v: the test proves nothing", rep.MarkTime, info.LastModified)
			}
			w.b.checkInvariant(t)
			w.present(t, "a", "b", "c")
		})
	}
}

// TestRefusesStoreIgnoringIfMatch: a store that honours create-only
// writes but not compare-and-swap would make the lease look exclusive
// when it is not: the collector refuses it and changes nothing.
func TestRefusesStoreIgnoringIfMatch(t *testing.T) {
	w := newWorld(t)
	w.b.ignoreIfMatch = true
	oldAndNew(w)
	before := w.b.keys()
	_, err := Run(w.ctx, w.b, w.opts())
	if !errors.Is(err, ErrStoreUnfit) || !errors.Is(err, bucket.ErrIfMatchIgnored) {
		t.Fatalf("gc on a store ignoring If-Match = %v, want ErrStoreUnfit and ErrIfMatchIgnored", err)
	}
	if !strings.Contains(err.Error(), "If-Match") {
		t.Errorf("the error does not name If-Match: %v", err)
	}
	if after := w.b.keys(); !slices.Equal(before, after) {
		t.Fatalf("the bucket changed:\nbefore %v\nafter  %v", before, after)
	}
}

// TestRefusesLooseClock: when the store's clock is known only to within
// more than the margin allows, a cycle refuses to start (a dry run warns).
func TestRefusesLooseClock(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	b := &boundedBucket{memBucket: w.b, bound: 45 * time.Second}
	before := w.b.keys()
	rep, err := Run(w.ctx, b, w.opts())
	var ce *ClockBoundError
	if !errors.As(err, &ce) || !errors.Is(err, ErrStoreUnfit) || ce.Bound != 45*time.Second {
		t.Fatalf("gc with a clock bound of 45s = %v, want a ClockBoundError", err)
	}
	if rep.ClockBound != 45*time.Second {
		t.Errorf("report's clock bound %v", rep.ClockBound)
	}
	if after := w.b.keys(); !slices.Equal(before, after) {
		t.Fatalf("the bucket changed:\nbefore %v\nafter  %v", before, after)
	}
	opt := w.opts()
	opt.DryRun = true
	rep, err = Run(w.ctx, b, opt)
	if err != nil || len(rep.Warnings) == 0 || !strings.Contains(rep.Warnings[0], "clock") {
		t.Fatalf("dry run: %v, warnings %v", err, rep.Warnings)
	}
	b.bound = 2 * time.Second
	if rep, err := Run(w.ctx, b, w.opts()); err != nil || rep.ClockBound != 2*time.Second || !rep.Complete {
		t.Fatalf("gc with a clock bound of 2s: %v, %+v", err, rep)
	}
	w.b.checkInvariant(t)
}

// TestLeaseExpiryAllowsForClockBound: an expired lease is taken over only
// once it has expired however far off the estimate of the store's clock
// may be.
func TestLeaseExpiryAllowsForClockBound(t *testing.T) {
	w := newWorld(t)
	// The estimate runs 2.5 s ahead of the store, within its bound of 3 s.
	b := &boundedBucket{memBucket: w.b, off: 2500 * time.Millisecond, bound: 3 * time.Second}
	if _, err := acquireLease(w.ctx, b, w.clock, leaseRecord{Holder: "x/1", Agent: "x", Host: "hx", TTL: time.Minute}, true); err != nil {
		t.Fatal(err)
	}
	info, _ := w.b.Stat(w.ctx, LeaseKey)
	// The lease's LastModified is cut to the second: expiry is at most a
	// second after until; go to until + 0.2 s by the store's clock.
	w.clock.Advance(info.LastModified.Add(time.Minute + 200*time.Millisecond).Sub(w.b.Now()))
	y := leaseRecord{Holder: "y/1", Agent: "y", Host: "hy", TTL: time.Minute}
	if _, err := acquireLease(w.ctx, b, w.clock, y, true); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("lease taken over %v after it expired by a clock known to within 3s: %v", 200*time.Millisecond, err)
	}
	w.clock.Advance(3 * time.Second)
	if _, err := acquireLease(w.ctx, b, w.clock, y, true); err != nil {
		t.Fatalf("lease not taken over 3.2s after it expired: %v", err)
	}
}

// TestCheckStore: what an operator sees of the store's fitness.
func TestCheckStore(t *testing.T) {
	w := newWorld(t)
	sc, err := CheckStore(w.ctx, &boundedBucket{memBucket: w.b, bound: 1200 * time.Millisecond})
	if err != nil || !sc.IfNoneMatch || !sc.IfMatch || sc.ClockBound != 1200*time.Millisecond || sc.Problem(time.Hour) != "" {
		t.Fatalf("good store: %+v, %v; problem %q", sc, err, sc.Problem(time.Hour))
	}
	w.b.ignoreIfMatch = true
	sc, err = CheckStore(w.ctx, w.b)
	if err != nil || sc.IfMatch || !strings.Contains(sc.Problem(time.Hour), "If-Match") {
		t.Fatalf("store ignoring If-Match: %+v, %v; problem %q", sc, err, sc.Problem(time.Hour))
	}
	if keys := w.b.keys(); len(keys) != 0 {
		t.Fatalf("probes left %v", keys)
	}
}

// slowBatches is a store whose delete requests naming more than limit
// keys do not finish within any margin.
type slowBatches struct {
	*memBucket
	limit int
	sizes []int
}

func (s *slowBatches) DeleteMany(ctx context.Context, keys []string) error {
	s.sizes = append(s.sizes, len(keys))
	if len(keys) > s.limit {
		<-ctx.Done()
		return ctx.Err()
	}
	return s.memBucket.DeleteMany(ctx, keys)
}

// TestSlowDeletesShrinkTheBatch: a store too slow to delete 1,000 keys
// within half a margin still gets collected: a request that runs out of
// its time is sent again with half the keys, each still bounded.
func TestSlowDeletesShrinkTheBatch(t *testing.T) {
	w := newWorld(t)
	for i := 0; i < 320; i++ {
		w.upload(nil, "p"+strconv.Itoa(i))
	}
	w.clock.Advance(2 * time.Hour)
	sb := &slowBatches{memBucket: w.b, limit: 300}
	opt := w.opts()
	opt.Grace = 8 * time.Second // margin 2 s: a request may take 1 s
	rep, err := Run(w.ctx, sb, opt)
	if err != nil {
		t.Fatalf("gc on a slow store: %v (request sizes %v)", err, sb.sizes)
	}
	if rep.Deleted.Narinfos != 320 || !rep.Complete {
		t.Fatalf("deleted %d narinfos, complete %v; want all 320", rep.Deleted.Narinfos, rep.Complete)
	}
	w.b.checkInvariant(t)
}

// laggingList hides objects from listings for lag after they were
// written, as an eventually consistent listing does.
type laggingList struct {
	*memBucket
	lag     time.Duration
	written map[string]time.Time
}

func (l *laggingList) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	l.written[key] = time.Now()
	return l.memBucket.Put(ctx, key, r, size, opts)
}

func (l *laggingList) List(ctx context.Context, o bucket.ListOptions, fn func(bucket.Object) error) error {
	return l.memBucket.List(ctx, o, func(obj bucket.Object) error {
		if time.Since(l.written[obj.Key]) < l.lag {
			return nil
		}
		return fn(obj)
	})
}

// TestRefusesLaggingListings: the sweep's listing must show what agents
// wrote before the danger zone; a store whose listings lag by half a
// margin or more is refused before anything is written, and the lag is
// what CheckStore reports.
func TestRefusesLaggingListings(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	b := &laggingList{memBucket: w.b, lag: 800 * time.Millisecond, written: map[string]time.Time{}}
	opt := w.opts()
	opt.Grace = 8 * time.Second // margin 2 s: less than 0.5 s of lag
	before := w.b.keys()
	_, err := Run(w.ctx, b, opt)
	var le *ListLagError
	if !errors.As(err, &le) || !errors.Is(err, ErrStoreUnfit) {
		t.Fatalf("gc with listings 0.8 s behind = %v, want a ListLagError", err)
	}
	if after := w.b.keys(); !slices.Equal(before, after) {
		t.Fatalf("the bucket changed:\nbefore %v\nafter  %v", before, after)
	}
	sc, err := CheckStore(w.ctx, b)
	if err != nil || sc.ListLag < 700*time.Millisecond || sc.Problem(opt.Grace) == "" {
		t.Fatalf("CheckStore: lag %v, problem %q, err %v", sc.ListLag, sc.Problem(opt.Grace), err)
	}
	b.lag = 0
	if sc, err := CheckStore(w.ctx, b); err != nil || sc.ListLag > 300*time.Millisecond {
		t.Fatalf("CheckStore on consistent listings: lag %v, err %v", sc.ListLag, err)
	}
}
