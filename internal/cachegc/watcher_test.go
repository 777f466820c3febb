package cachegc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// TestWatcherForgetsAnnouncedPaths: the presence cache drops announced
// paths when the announcement is first seen, and again when its cycle
// ends (presence learned meanwhile may predate the deletion).
func TestWatcherForgetsAnnouncedPaths(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	var forgotten [][]string
	var mu sync.Mutex
	g := NewWatcher(WatcherOptions{Bucket: w.b, Clock: w.clock, Forget: func(p []string) {
		mu.Lock()
		forgotten = append(forgotten, slices.Sorted(slices.Values(p)))
		mu.Unlock()
	}})
	opt := w.opts()
	var active bool
	opt.afterAnnounce = func() {
		g.Poll(w.ctx)
		active = g.Doomed(hashOf("a")+".narinfo") && g.Doomed(narKey("c")) && !g.Doomed(hashOf("e")+".narinfo")
	}
	w.run(opt)
	if !active {
		t.Fatal("announced objects not reported doomed while the cycle ran")
	}
	g.Poll(w.ctx)
	if g.Doomed(hashOf("a") + ".narinfo") {
		t.Fatal("still doomed after the cycle was retired")
	}
	want := []string{pathOf("a"), pathOf("b"), pathOf("c")}
	slices.Sort(want)
	if len(forgotten) != 2 || !slices.Equal(forgotten[0], want) || !slices.Equal(forgotten[1], want) {
		t.Fatalf("forgotten %v, want %v twice", forgotten, want)
	}
	// A watcher that starts after the cycle forgets them once, too: its
	// agent may remember them from before a restart.
	forgotten = nil
	g2 := NewWatcher(WatcherOptions{Bucket: w.b, Clock: w.clock, Forget: g.opt.Forget})
	g2.Poll(w.ctx)
	if len(forgotten) != 1 || !slices.Equal(forgotten[0], want) {
		t.Fatalf("a new watcher forgot %v", forgotten)
	}
}

// TestCheckListsWhenStale: a Check long after the last listing lists the
// announcements itself before answering.
func TestCheckListsWhenStale(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	g := w.watcher()
	if err := g.Poll(w.ctx); err != nil {
		t.Fatal(err)
	}
	opt := w.opts()
	var err error
	var listsBefore, listsAfter int
	opt.afterAnnounce = func() {
		w.clock.at(w.clock.Now().Add(opt.Grace-time.Second), func() {
			w.b.mu.Lock()
			listsBefore = w.b.lists
			w.b.mu.Unlock()
			_, err = g.Check(w.ctx, []string{hashOf("b") + ".narinfo"})
			w.b.mu.Lock()
			listsAfter = w.b.lists
			w.b.mu.Unlock()
		})
	}
	w.run(opt)
	if !errors.Is(err, ErrCollecting) || listsAfter != listsBefore+1 {
		t.Fatalf("stale Check = %v after %d listings; want one listing and a refusal", err, listsAfter-listsBefore)
	}
}

// TestAnnouncementSeenLate: an agent that first sees an announcement when
// it is already old (by the store's clock) is in the danger zone at once;
// one that sees it young is not.
func TestAnnouncementSeenLate(t *testing.T) {
	for _, skew := range []time.Duration{0, time.Hour, -time.Hour} {
		t.Run(skew.String(), func(t *testing.T) {
			w := newWorld(t)
			w.b.skew = skew
			oldAndNew(w)
			opt := w.opts()
			tm := TimingFor(opt.Grace)
			var young, old error
			opt.afterAnnounce = func() {
				now := w.clock.Now()
				w.clock.at(now.Add(time.Minute), func() {
					g := w.watcher()
					_, young = g.Check(w.ctx, []string{hashOf("b") + ".narinfo"})
				})
				w.clock.at(now.Add(tm.Grace-tm.Margin+time.Second), func() {
					g := w.watcher()
					_, old = g.Check(w.ctx, []string{hashOf("b") + ".narinfo"})
				})
			}
			w.run(opt)
			if young != nil || !errors.Is(old, ErrCollecting) {
				t.Fatalf("young announcement: %v; old one: %v", young, old)
			}
		})
	}
}

// TestCheckBoundsTheWrite: Check says how long the write it allows may
// take, so that a write given up then (and landing within half a margin
// more) lands before the sweep of a cycle dooming what it relies on, or
// of one announced after the watcher's last listing.
func TestCheckBoundsTheWrite(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	opt := w.opts()
	tm := TimingFor(opt.Grace)
	var doomed, free time.Duration
	var errD, errF error
	var announced, checked time.Time
	var g *Watcher
	opt.afterAnnounce = func() {
		announced = w.clock.Now()
		w.clock.at(announced.Add(time.Minute), func() {
			g = w.watcher()
			checked = w.clock.Now()
			doomed, errD = g.Check(w.ctx, []string{hashOf("b") + ".narinfo"})
			free, errF = g.Check(w.ctx, []string{hashOf("e") + ".narinfo"})
		})
	}
	w.run(opt)
	if errD != nil || errF != nil {
		t.Fatalf("checks before the danger zone: %v, %v", errD, errF)
	}
	if doomed <= 0 || !checked.Add(doomed+tm.Margin/2).Before(announced.Add(opt.Grace)) {
		t.Fatalf("a write relying on a doomed key may take %s from %s after the announcement; the sweep begins %s after it",
			doomed, checked.Sub(announced), opt.Grace)
	}
	if free <= 0 || free > g.Stale()+clockSlack+MinMargin/2 {
		t.Fatalf("a write relying on nothing doomed may take %s; want at most the staleness bound %s + %s + %s",
			free, g.Stale(), clockSlack, MinMargin/2)
	}
}

// failingList is a bucket whose listings fail.
type failingList struct{ *memBucket }

func (f failingList) List(context.Context, bucket.ListOptions, func(bucket.Object) error) error {
	return fmt.Errorf("list: %w", bucket.ErrUnavailable)
}

// TestCheckFailsClosed: without a listing, Check refuses.
func TestCheckFailsClosed(t *testing.T) {
	w := newWorld(t)
	g := NewWatcher(WatcherOptions{Bucket: failingList{w.b}, Clock: w.clock})
	if _, err := g.Check(w.ctx, []string{hashOf("a") + ".narinfo"}); err == nil || !errors.Is(err, bucket.ErrUnavailable) {
		t.Fatalf("Check without announcements = %v, want the listing's error", err)
	}
	// An unreadable announcement fails the poll too.
	w.put(announceKey("20300101T000000Z-00000000"), "not zstd")
	g = w.watcher()
	if _, err := g.Check(w.ctx, nil); err == nil {
		t.Fatal("Check with an unreadable announcement passed")
	}
}

// TestRandomInterleavings runs collection cycles while simulated agents
// upload new paths relying on old ones at random moments: in the grace,
// at its end, between delete requests. Each agent checks, then writes its
// narinfo up to half a margin later. At every instant the invariant must
// hold (checked after each delete and each narinfo write), and every
// narinfo written must survive the cycle with its closure.
func TestRandomInterleavings(t *testing.T) {
	seeds := 200
	if testing.Short() {
		seeds = 30
	}
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { randomInterleaving(t, uint64(seed)) })
	}
}

func randomInterleaving(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 99))
	w := newWorld(t)
	w.b.skew = time.Duration(rng.IntN(7200)-3600) * time.Second
	w.b.checkWrites = true
	// An old random DAG.
	var names []string
	for i := 0; i < 30; i++ {
		n := fmt.Sprintf("old%d", i)
		var refs []string
		for j := 0; j < rng.IntN(3) && i > 0; j++ {
			refs = append(refs, names[rng.IntN(i)])
		}
		w.upload(nil, n, uniq(refs)...)
		names = append(names, n)
	}
	w.clock.Advance(10 * time.Hour)
	opt := w.opts()
	opt.KeepSince = 5 * time.Hour
	opt.Grace = time.Duration(20+rng.IntN(600)) * time.Second
	tm := TimingFor(opt.Grace)

	type agent struct {
		g       *Watcher
		present map[string]bool
	}
	var agents []*agent
	for i := 0; i < 3; i++ {
		a := &agent{present: map[string]bool{}}
		a.g = NewWatcher(WatcherOptions{Bucket: w.b, Clock: w.clock, Poll: tm.Margin, Forget: func(ps []string) {
			for _, p := range ps {
				delete(a.present, p)
			}
		}})
		agents = append(agents, a)
	}
	var written []string // narinfos written since the mark
	next := 0
	// step is one agent's upload of a new path relying on random
	// others: HEAD what it does not know, NAR, Check, and the narinfo a
	// little later.
	step := func(a *agent) {
		n := fmt.Sprintf("new%d", next)
		next++
		var refs []string
		for j := 0; j < 1+rng.IntN(3); j++ {
			r := names[rng.IntN(len(names))]
			if !a.present[pathOf(r)] {
				if _, err := w.b.Stat(w.ctx, hashOf(r)+".narinfo"); err != nil {
					continue
				}
				a.present[pathOf(r)] = true
			}
			refs = append(refs, r)
		}
		refs = uniq(refs)
		put := func(key, body string) {
			w.b.Put(w.ctx, key, stringsReader(body), int64(len(body)), bucket.PutOptions{})
		}
		put(narKey(n), "NAR of "+n)
		relied := []string{narKey(n)}
		for _, r := range refs {
			relied = append(relied, hashOf(r)+".narinfo")
		}
		if _, err := a.g.Check(w.ctx, relied); err != nil {
			if !errors.Is(err, ErrCollecting) {
				t.Errorf("Check: %v", err)
			}
			for _, r := range refs {
				delete(a.present, pathOf(r))
			}
			return
		}
		delay := time.Duration(rng.Int64N(int64(tm.Margin / 2)))
		w.clock.at(w.clock.Now().Add(delay), func() {
			put(hashOf(n)+".narinfo", narinfoOf(n, refs...))
			written = append(written, n)
			names = append(names, n)
			a.present[pathOf(n)] = true
		})
	}
	schedule := func(from time.Time, span time.Duration) {
		for i := 0; i < 12; i++ {
			a := agents[rng.IntN(len(agents))]
			w.clock.at(from.Add(time.Duration(rng.Int64N(int64(span)))), func() { step(a) })
		}
		for _, a := range agents {
			for t := time.Duration(rng.Int64N(int64(tm.Margin))); t < span; t += tm.Margin {
				w.clock.at(from.Add(t), func() { a.g.Poll(w.ctx) })
			}
		}
	}
	opt.afterAnnounce = func() { schedule(w.clock.Now(), opt.Grace+opt.Grace/4) }
	opt.beforeDelete = func(string, []string) {
		// Slow deletes: agents act between them.
		w.clock.Advance(time.Duration(rng.Int64N(int64(tm.Margin))))
	}
	for _, a := range agents {
		a.g.Poll(w.ctx)
	}
	rep, err := Run(w.ctx, w.b, opt)
	if err != nil && !errors.Is(err, ErrWindowOver) {
		t.Fatalf("gc: %v", err)
	}
	w.clock.Advance(opt.Grace * 3) // run what is still scheduled
	w.b.checkInvariant(t)
	for _, n := range written {
		if !w.b.has(hashOf(n) + ".narinfo") {
			t.Errorf("%s was written during the cycle and then deleted", n)
		}
	}
	if rep.Deleted.Narinfos == 0 && rep.Doomed.Narinfos > rep.Revived {
		t.Errorf("nothing deleted: %+v", rep)
	}
}

func uniq(s []string) []string {
	slices.Sort(s)
	return slices.Compact(s)
}

// unlistable is a bucket this agent's URL cannot list (the bucket is named
// inside endpoint=): listings fail for good, objects can be read.
type unlistableBucket struct{ *memBucket }

func (unlistableBucket) List(context.Context, bucket.ListOptions, func(bucket.Object) error) error {
	return fmt.Errorf("list: %w (NoSuchKey)", bucket.ErrNotExist)
}

// TestBlindWatcher: an agent that cannot list the bucket registers as
// blind; while it is registered no cycle starts; it writes narinfos only
// while no collector holds the lease.
func TestBlindWatcher(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	g := NewWatcher(WatcherOptions{Bucket: unlistableBucket{w.b}, Clock: w.clock, Poll: time.Minute, ID: "agent-9", Host: "builder-9"})
	within, err := g.Check(w.ctx, []string{hashOf("a") + ".narinfo"})
	if err != nil {
		t.Fatalf("Check of a blind agent with no collector at work = %v", err)
	}
	// A collector taking the lease after this check sweeps after a grace
	// of at least Stale + clockSlack + MinMargin: the write is in by then.
	if within <= 0 || within+MinMargin/2 > g.Stale()+clockSlack+MinMargin {
		t.Fatalf("a blind agent's write may take %s", within)
	}
	var rec WatcherRecord
	if _, err := getJSON(w.ctx, w.b, WatcherPrefix+"agent-9", &rec); err != nil || !rec.Blind {
		t.Fatalf("registration %+v, %v; want it marked blind", rec, err)
	}
	// A collector (with a URL that can list) refuses to start.
	_, err = Run(w.ctx, w.b, w.opts())
	var blind *BlindWatcherError
	if !errors.As(err, &blind) || blind.Host != "builder-9" {
		t.Fatalf("Run with a blind agent registered = %v", err)
	}
	w.present(t, "a", "b", "c")
	// While a collector holds the lease (one that started before the
	// registration), the blind agent waits.
	if _, err := acquireLease(w.ctx, w.b, w.clock, leaseRecord{Holder: "x/1", Agent: "x", Host: "hx", TTL: time.Hour}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Check(w.ctx, nil); err == nil || !strings.Contains(err.Error(), "holds the lease") {
		t.Fatalf("Check while a collector holds the lease = %v", err)
	}
	if g.Doomed(hashOf("a") + ".narinfo") {
		t.Fatal("a blind agent claims to know what is doomed")
	}
}

// TestDangerAllowsForClockBound: a watcher whose estimate of the store's
// clock is behind (within its measured bound) underestimates an
// announcement's age; the danger zone must still begin no later than the
// collector's timing says.
func TestDangerAllowsForClockBound(t *testing.T) {
	w := newWorld(t)
	oldAndNew(w)
	// The agent's estimate is 4 s behind the store's clock, which its
	// measurement says it may be (bound 5 s).
	g := NewWatcher(WatcherOptions{Bucket: &boundedBucket{memBucket: w.b, off: -4 * time.Second, bound: 5 * time.Second}, Clock: w.clock, Poll: 10 * time.Second})
	opt := w.opts()
	tm := TimingFor(opt.Grace)
	var inDanger error
	opt.afterAnnounce = func() {
		now := w.clock.Now()
		w.clock.at(now.Add(10*time.Second), func() {
			if err := g.Poll(w.ctx); err != nil {
				t.Error(err)
			}
		})
		// Just inside the danger zone by the collector's timing.
		w.clock.at(now.Add(tm.Grace-tm.Margin+500*time.Millisecond), func() {
			_, inDanger = g.Check(w.ctx, []string{hashOf("b") + ".narinfo"})
		})
	}
	w.run(opt)
	if !errors.Is(inDanger, ErrCollecting) {
		t.Fatalf("check half a second into the danger zone = %v, want a refusal", inDanger)
	}
}

// TestUndecodableAnnouncementIsReported: an announcement that cannot be
// decoded stops narinfo writes (it may doom what they rely on), and says
// so: Check's error and LastError name the object, which is what doctor
// shows the operator. Once it is gone, writes go on.
func TestUndecodableAnnouncementIsReported(t *testing.T) {
	w := newWorld(t)
	key := announceKey("20260101T000000Z-deadbeef")
	if _, err := w.b.Put(w.ctx, key, strings.NewReader("not an announcement"), 19, bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	g := NewWatcher(WatcherOptions{Bucket: w.b, Clock: w.clock})
	if _, err := g.Check(w.ctx, []string{"x.narinfo"}); err == nil || !strings.Contains(err.Error(), key) {
		t.Fatalf("Check with an undecodable announcement: %v", err)
	}
	if err := g.LastError(); err == nil || !strings.Contains(err.Error(), key) {
		t.Fatalf("LastError: %v", err)
	}
	if err := w.b.Delete(w.ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Check(w.ctx, []string{"x.narinfo"}); err != nil {
		t.Fatalf("Check once the announcement is gone: %v", err)
	}
	if err := g.LastError(); err != nil {
		t.Fatalf("LastError once the announcement is gone: %v", err)
	}
}
