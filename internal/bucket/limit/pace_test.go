package limit

import (
	"context"
	"io"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
)

// simLink is one direction of a bottleneck link: a first-come queue
// drained at rate bytes per second, each connection holding at most window
// bytes in it (a TCP window), with a base round trip.
type simLink struct {
	mu     sync.Mutex
	free   time.Time
	rate   float64
	window float64
	base   time.Duration
}

// enter queues n bytes now and returns when they leave the link.
func (l *simLink) enter(n int) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if l.free.Before(now) {
		l.free = now
	}
	l.free = l.free.Add(time.Duration(float64(n) / l.rate * float64(time.Second)))
	return l.free
}

// linkBucket carries large puts and small stats over one simLink.
type linkBucket struct {
	bucket.Bucket
	link *simLink
	sent atomic.Int64 // body bytes that left the link
}

func sleepUntil(t time.Time) { time.Sleep(time.Until(t)) }

func (b *linkBucket) Stat(ctx context.Context, key string) (bucket.Info, error) {
	sleepUntil(b.link.enter(300).Add(b.link.base))
	return bucket.Info{}, bucket.ErrNotExist
}

func (b *linkBucket) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	buf := make([]byte, 32<<10)
	hold := time.Duration(b.link.window / b.link.rate * float64(time.Second))
	var last time.Time
	for {
		n, err := r.Read(buf)
		if n > 0 {
			last = b.link.enter(n)
			sleepUntil(last.Add(-hold)) // the window is full: the sender waits
			b.sent.Add(int64(n))
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return bucket.Info{}, err
		}
	}
	sleepUntil(last.Add(b.link.base))
	return bucket.Info{}, nil
}

// zeros is an endless body.
type zeros struct{ left int64 }

func (z *zeros) Read(b []byte) (int, error) {
	if z.left == 0 {
		return 0, io.EOF
	}
	n := int(min(int64(len(b)), z.left))
	clear(b[:n])
	z.left -= int64(n)
	return n, nil
}

// runBulk sends 8 MiB puts on three connections for d while a small
// request is timed every 50 ms, and returns the small requests' round
// trips in the second half and the link's goodput in it.
func runBulk(t *testing.T, opt Options, d time.Duration) ([]time.Duration, float64) {
	t.Helper()
	fb, err := filebucket.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	lb := &linkBucket{Bucket: fb, link: &simLink{rate: 20e6, window: 4 << 20, base: 20 * time.Millisecond}}
	w := Wrap(lb, New(opt))
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			for ctx.Err() == nil {
				_, _ = w.Put(ctx, "nar/big", &zeros{left: 8 << 20}, 8<<20, bucket.PutOptions{})
			}
		})
	}
	half := time.Now().Add(d / 2)
	var rtts []time.Duration
	var sentAtHalf int64
	for ctx.Err() == nil {
		start := time.Now()
		_, _ = w.Stat(ctx, "x.narinfo")
		if start.After(half) {
			if sentAtHalf == 0 {
				sentAtHalf = lb.sent.Load()
			}
			rtts = append(rtts, time.Since(start))
		}
		time.Sleep(50 * time.Millisecond)
	}
	goodput := float64(lb.sent.Load()-sentAtHalf) / time.Since(half).Seconds()
	cancel()
	wg.Wait()
	slices.Sort(rtts)
	return rtts, goodput
}

// TestPacerKeepsTheQueueShortAndTheLinkFull: three large uploads over a
// 20 MB/s link whose connections may each queue 4 MiB (0.2 s). Unpaced,
// every small request waits 0.2–0.6 s behind them; paced, near the
// pacer's target, while the link still carries most of its rate.
func TestPacerKeepsTheQueueShortAndTheLinkFull(t *testing.T) {
	if testing.Short() {
		t.Skip("runs 6 s of simulated transfers")
	}
	const target = 30 * time.Millisecond
	rtts, goodput := runBulk(t, Options{Max: 16, Pacer: NewPacer(PaceOptions{Target: target, Every: 50 * time.Millisecond})}, 4*time.Second)
	if len(rtts) < 10 {
		t.Fatalf("only %d small requests timed", len(rtts))
	}
	p50 := rtts[len(rtts)/2]
	t.Logf("paced: small round trip p50 %v p90 %v, goodput %.1f MB/s", p50, rtts[len(rtts)*9/10], goodput/1e6)
	// base 20 ms + target, with room for timer noise on a loaded machine.
	if p50 > 20*time.Millisecond+3*target {
		t.Errorf("small requests wait %v (p50) behind large uploads, want about 20 ms + %v", p50, target)
	}
	if goodput < 0.75*20e6 {
		t.Errorf("large uploads carried %.1f MB/s of a 20 MB/s link, want ≥ 15", goodput/1e6)
	}

	rtts, _ = runBulk(t, Options{Max: 16}, 2*time.Second)
	if p50 := rtts[len(rtts)/2]; p50 < 150*time.Millisecond {
		t.Errorf("unpaced, small requests waited only %v: the simulated link does not queue, the test proves nothing", p50)
	}
}

// TestPacerAdjustsTowardTarget: with no queue the rate is a little above
// the link's estimate; a queue above Target brings it below, in proportion;
// a standing queue that does not grow makes what was sent the link's rate;
// a huge queue takes the rate to the floor, not to zero.
func TestPacerAdjustsTowardTarget(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	p := NewPacer(PaceOptions{Target: 50 * time.Millisecond, Drain: 500 * time.Millisecond, Initial: 1e6, Floor: 100e3, Every: 100 * time.Millisecond, Now: clk.Now})
	_, done := p.body(context.Background(), &zeros{}, nil)
	defer done()
	step := func(rtt time.Duration, sent int64) PaceStats {
		p.mu.Lock()
		p.read += sent
		p.mu.Unlock()
		clk.Add(100 * time.Millisecond)
		p.Observe(rtt)
		return p.Stats()
	}
	step(20*time.Millisecond, 0) // base 20 ms
	p.mu.Lock()
	p.slowStart = false // the control law after slow start (see TestPacerSlowStart)
	p.mu.Unlock()
	if s := step(20*time.Millisecond, 0); s.Rate != 1e6*1.1 {
		t.Fatalf("no queue: rate %.0f, want the estimate + Target/Drain = 1.1e6", s.Rate)
	}
	if s := step(120*time.Millisecond, 0); s.QueueDelay != 100*time.Millisecond || s.Rate != 1e6*0.9 {
		t.Fatalf("queue of 2 × Target: %+v, want delay 100 ms and rate 0.9e6", s)
	}
	step(120*time.Millisecond, 0)
	if s := step(120*time.Millisecond, 400e3); s.Rate <= 0.9e6*1.1 {
		t.Fatalf("4 MB/s sent with a queue that does not grow: rate %.0f, want the estimate raised toward 4e6", s.Rate)
	}
	step(2*time.Second, 0)
	if s := step(2*time.Second, 0); s.Rate != 100e3 {
		t.Fatalf("rate %.0f under a 2 s queue, want the floor", s.Rate)
	}
	if s := p.Stats(); s.BaseRTT != 20*time.Millisecond || s.Bodies != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// TestPacerSlowStart: until a queue shows, the estimate grows by a
// quarter per interval while the bodies use the rate; the first queue
// halves the rate.
func TestPacerSlowStart(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	p := NewPacer(PaceOptions{Target: 50 * time.Millisecond, Drain: 500 * time.Millisecond, Initial: 1e6, Every: 100 * time.Millisecond, Now: clk.Now})
	_, done := p.body(context.Background(), &zeros{}, nil)
	defer done()
	step := func(rtt time.Duration) PaceStats {
		p.mu.Lock()
		p.read += int64(p.rate / 10) // the bodies take all the rate allows
		p.mu.Unlock()
		clk.Add(100 * time.Millisecond)
		p.Observe(rtt)
		return p.Stats()
	}
	step(20 * time.Millisecond)
	prev := step(20 * time.Millisecond).Rate
	for range 5 {
		r := step(20 * time.Millisecond).Rate
		if r < prev*1.2 {
			t.Fatalf("slow start: rate %.0f after %.0f, want ≥ 1.2×", r, prev)
		}
		prev = r
	}
	peak := step(40 * time.Millisecond).Rate // a queue of 20 ms, counted once two intervals show it
	if r := step(40 * time.Millisecond).Rate; r > peak*0.6 {
		t.Fatalf("first queue: rate %.0f after %.0f, want about halved", r, peak)
	}
}

// TestPacerLeavesNearStoresUnpaced: under NearBase of round trip there is
// no uplink to keep clear, and bodies go unlimited.
func TestPacerLeavesNearStoresUnpaced(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	p := NewPacer(PaceOptions{Initial: 1e6, Max: 1e9, Now: clk.Now})
	_, done := p.body(context.Background(), &zeros{}, nil)
	defer done()
	for range 3 {
		clk.Add(time.Second)
		p.Observe(2 * time.Millisecond)
	}
	if s := p.Stats(); s.Rate <= 1e9 {
		t.Fatalf("rate %.0f with a 2 ms base, want unlimited (past Max)", s.Rate)
	}
}

// TestPacerUnpacesANearStoreBeforeTheFirstBody: the small requests before
// a NAR's body show a near store, and the body then starts unlimited, not
// at Initial until the first adjustment.
func TestPacerUnpacesANearStoreBeforeTheFirstBody(t *testing.T) {
	p := NewPacer(PaceOptions{Initial: 100e3, Floor: 100e3})
	p.Observe(2 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, done := p.body(ctx, &zeros{left: 8 << 20}, nil)
	defer done()
	n, err := io.Copy(io.Discard, r)
	if err != nil || n != 8<<20 {
		t.Fatalf("8 MiB body after a 2 ms round trip: %d bytes, %v; want all of it unpaced (at Initial it takes 80 s)", n, err)
	}
}

// TestPacerLearnsOnlyTheBaseWhileIdle: without a large body, samples
// teach the base round trip but do not move the rate.
func TestPacerLearnsOnlyTheBaseWhileIdle(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	p := NewPacer(PaceOptions{Initial: 1e6, Now: clk.Now})
	for _, rtt := range []time.Duration{30, 10, 500} {
		clk.Add(time.Second)
		p.Observe(rtt * time.Millisecond)
	}
	if s := p.Stats(); s.Rate != 1e6 || s.BaseRTT != 10*time.Millisecond {
		t.Fatalf("stats %+v, want rate unchanged and base 10 ms", s)
	}
	clk.Add(11 * time.Minute)
	p.Observe(40 * time.Millisecond)
	if s := p.Stats(); s.BaseRTT != 40*time.Millisecond {
		t.Fatalf("base %v after ten minutes, want the new sample's 40 ms", s.BaseRTT)
	}
}

// TestPacerDrainsToKeepItsBase: bodies that flow for half an hour keep a
// standing queue of Target; every sample taken meanwhile includes it. The
// pacer holds them back briefly now and then, so that the base it
// remembers stays the link's, not the link's plus its own queue (which
// would let the queue grow by Target every ten minutes).
func TestPacerDrainsToKeepItsBase(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	p := NewPacer(PaceOptions{Initial: 1e6, Floor: 1e3, Now: clk.Now})
	_, done := p.body(context.Background(), &zeros{}, nil)
	defer done()
	const base, step = 30 * time.Millisecond, 50 * time.Millisecond
	var drainingSteps, steps int
	for range int(30 * time.Minute / step) {
		steps++
		queue := 15 * time.Millisecond
		p.mu.Lock()
		held := clk.Now().Before(p.drainUntil)
		p.mu.Unlock()
		if held { // held back: the queue has drained
			queue = 0
			drainingSteps++
		}
		clk.Add(step)
		p.Observe(base + queue)
	}
	if got := p.Stats().BaseRTT; got != base {
		t.Errorf("after 30 min of uploads the base is %v, want %v", got, base)
	}
	if drainingSteps == 0 || float64(drainingSteps)/float64(steps) > 0.01 {
		t.Errorf("held back %d of %d steps, want some and at most 1%%", drainingSteps, steps)
	}
}

// statCounter counts the Stats (the pacer's probes) that reach the store.
type statCounter struct {
	bucket.Bucket
	stats atomic.Int64
}

func (b *statCounter) Stat(ctx context.Context, key string) (bucket.Info, error) {
	b.stats.Add(1)
	return bucket.Info{}, bucket.ErrNotExist
}

// TestPacerCountsABodyOnlyOnceItHoldsASlot: a large put that never gets a
// slot of the window (here: its context ends first) is no body of the
// pacer's: it starts no probes, and sends nothing that the link's
// estimate could read as the link's rate.
func TestPacerCountsABodyOnlyOnceItHoldsASlot(t *testing.T) {
	fb, err := filebucket.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	inner := &statCounter{Bucket: fb}
	p := NewPacer(PaceOptions{})
	w := Wrap(inner, New(Options{Max: 4, Pacer: p}))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	const size = 2 << 20
	if _, err := w.Put(ctx, "nar/x.nar", &zeros{left: size}, size, bucket.PutOptions{SHA256: make([]byte, 32)}); err == nil {
		t.Fatal("put with an ended context succeeded")
	}
	if n := inner.stats.Load(); n != 0 {
		t.Errorf("a put that never held a slot sent %d probes", n)
	}
	if s := p.Stats(); s.Bodies != 0 {
		t.Errorf("pacer still counts %d bodies", s.Bodies)
	}
}

// TestPacerEndsADrainWithoutSamples: a drain that no probe answer follows
// (the store stopped answering HEADs) still ends on time: the bodies' own
// reads end it, instead of leaving them at Floor until a sample comes.
func TestPacerEndsADrainWithoutSamples(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	p := NewPacer(PaceOptions{Initial: 1e6, Floor: 1e3, Now: clk.Now})
	_, done := p.body(context.Background(), &zeros{}, nil)
	defer done()
	for range int(drainEvery/(50*time.Millisecond)) + 2 {
		clk.Add(50 * time.Millisecond)
		p.Observe(30 * time.Millisecond)
	}
	if got := float64(p.lim.Limit()); got != 1e3 {
		t.Fatalf("limit %.0f after %v of bodies, want the drain's Floor", got, drainEvery)
	}
	clk.Add(drainFor) // no sample meanwhile
	p.count(64 << 10)
	if got, want := float64(p.lim.Limit()), p.Stats().Rate; got != want || got <= 1e3 {
		t.Fatalf("limit %.0f after the drain's end with no sample, want the rate %.0f restored", got, want)
	}
}
