package limit

import (
	"context"
	"io"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Pacer keeps large uploads from queueing in front of the link they share
// with small requests. An uplink's bottleneck (a modem, a VPN, a NAT box)
// is a first-come queue: a large upload sending as fast as TCP lets it
// fills that queue, and every small request behind it (a 100 kB NAR, a
// narinfo, a HEAD) waits for the bytes ahead of it, several times per
// path. The pacer is a delay-based sender in the spirit of LEDBAT
// (RFC 6817): it measures the round trip of small requests, takes the
// lowest seen over ten minutes as the base round trip, and reads the
// excess as queueing delay. It then sets the rate of the large uploads'
// bodies from two figures:
//
//   - the link's rate: while a queue stands, the link is busy, and what
//     the bodies sent minus what the queue grew by is what it carried
//     (rate = sent / (1 + d(delay)/dt)); while no queue stands, the link
//     carried at least what was sent;
//   - the queue's distance from Target: the bodies go at the link's rate,
//     plus or minus what brings the queueing delay to Target within Drain.
//
// The link stays full (a standing queue of Target keeps it busy), so a
// large upload loses little throughput, while a small request waits about
// Target more than on an idle link. With no queue the rate is the link's
// estimate plus Target/Drain, which is how the estimate grows (1.5% per
// interval with the defaults) once a queue has been seen; before that it
// grows by a quarter per interval (slow start) and is halved when the
// first queue shows. A store whose base round trip is under NearBase (this
// machine, the LAN) has no slow uplink in front of it: bodies go unpaced.
//
// The signal comes from every small request through the window and, while
// a large body is being sent, from a probe (a HEAD of one small object) at
// a fixed interval, so that the queue is measured before the first small
// path arrives instead of by it.
//
// Assumptions the argument rests on, checked where they can be:
//   - small requests and large bodies cross the same bottleneck (the same
//     store endpoint): the probe asks the store the bodies go to;
//   - the store answers a HEAD in about constant time, so that a rise in
//     its round trip is queueing on the way: the base is a minimum, and the
//     delay is read from the lowest sample of each adjustment interval, so
//     that one slow answer is not taken for a queue;
//   - nothing else shares the bottleneck in a way that keeps it full for
//     ten minutes (the base would then include that queue, and the pacer
//     only holds the delay near Target above it, as LEDBAT does). The
//     pacer's own queue would do the same during a long upload; it drains
//     that queue briefly every drainEvery instead.
type Pacer struct {
	opt PaceOptions
	lim *rate.Limiter

	mu         sync.Mutex
	rate       float64 // bytes per second of large bodies; +Inf once past Max
	base       baseFilter
	intervalLo time.Duration // lowest sample since the last adjustment
	// clean is when the base was last measured without this pacer's own
	// queue (no body in flight, or the end of a drain); drainUntil ends
	// the drain under way.
	clean, drainUntil time.Time
	lastAdjust        time.Time
	queueDelay        time.Duration // queueing delay read at the last adjustment
	bodies            int           // large bodies being sent
	read              int64         // body bytes taken since the last adjustment
	linkRate          float64       // estimate of what the link carries, bytes per second
	prevDelay         time.Duration // queueDelay at the adjustment before
	// slowStart is set until the first queue shows: the estimate grows by
	// slowStartGain each interval, so that a fast link is found in seconds
	// rather than minutes. Not by doubling, as TCP's slow start does: the
	// queue is only seen one queue later (a probe returns after waiting in
	// it), and by then a doubling rate has filled every buffer on the way
	// (over a second of queue on a 20 MB/s link).
	slowStart bool
	stopProbe context.CancelFunc
	probeDone chan struct{}
}

// PaceOptions tune a Pacer; zero values take the defaults.
type PaceOptions struct {
	// Target is the queueing delay large uploads may add to a small
	// request; default 15 ms.
	Target time.Duration
	// Floor is the rate large uploads never fall below, so that they
	// always progress; default 256 KiB/s. Initial is the rate before the
	// first measurement; default 4 MiB/s. Above Max (default 4 GiB/s) the
	// bodies are not limited at all.
	Floor, Initial, Max float64
	// Every is how often the rate is adjusted; while a large body is being
	// sent the store is probed twice as often; default 100 ms.
	// Drain is how soon a queue off Target is meant to be back at it;
	// default 1 s.
	Every, Drain time.Duration
	// NearBase is the base round trip below which the store counts as
	// near (on this machine or its LAN, with no slow uplink on the way)
	// and large bodies are not paced; default 10 ms.
	NearBase time.Duration
	// ProbeKey is the object whose HEAD probes the store (any small
	// object; a missing one answers as fast); default "nix-cache-info".
	ProbeKey string
	// Now is the clock; default time.Now.
	Now func() time.Time
}

const (
	// smoothing is the weight of a new sample of the link's rate.
	smoothing = 0.25
	// slowStartGain is the estimate's growth per interval until a queue
	// first shows; maxProbes the probes waiting for an answer at once.
	slowStartGain, maxProbes = 1.25, 8
	// baseSpan is how long the lowest round trip is remembered, in slots.
	baseSpan, baseSlots = 10 * time.Minute, 10
	// drainEvery is how long bodies may flow before the pacer holds them
	// back for drainFor, so that its own queue drains and the probes see
	// the base again: otherwise, after baseSpan of uninterrupted uploads,
	// every remembered sample would include the Target the pacer keeps,
	// and the base would creep up by Target each baseSpan. It is well
	// under baseSpan, so a fresh clean sample is always remembered; a
	// drain costs drainFor/drainEvery of the throughput (0.1%).
	drainEvery, drainFor = 3 * time.Minute, 200 * time.Millisecond
)

// NewPacer returns a pacer at opt.Initial.
func NewPacer(opt PaceOptions) *Pacer {
	if opt.Target <= 0 {
		opt.Target = 15 * time.Millisecond
	}
	if opt.Floor <= 0 {
		opt.Floor = 256 << 10
	}
	if opt.Initial <= 0 {
		opt.Initial = 4 << 20
	}
	if opt.Max <= 0 {
		opt.Max = 4 << 30
	}
	opt.Initial = min(max(opt.Initial, opt.Floor), opt.Max)
	if opt.Every <= 0 {
		opt.Every = 100 * time.Millisecond
	}
	if opt.Drain <= 0 {
		opt.Drain = time.Second
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.NearBase <= 0 {
		opt.NearBase = 10 * time.Millisecond
	}
	if opt.ProbeKey == "" {
		opt.ProbeKey = "nix-cache-info"
	}
	p := &Pacer{opt: opt, rate: opt.Initial, linkRate: opt.Initial, slowStart: true, clean: opt.Now()}
	p.lim = rate.NewLimiter(rate.Limit(opt.Initial), burst)
	return p
}

// burst is the most bytes a body reads at once, and the limiter's bucket.
const burst = 64 << 10

// Observe records the round trip of a small request.
func (p *Pacer) Observe(rtt time.Duration) {
	if rtt <= 0 {
		return
	}
	now := p.opt.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.base.add(now, rtt)
	if p.base.min(now) < p.opt.NearBase {
		// A near store: a queue of Target would be most of the round
		// trip, and there is no slow uplink to keep clear. Decided on the
		// first sample (the small requests before a NAR's body give it),
		// so that no body starts at Initial against a local store.
		p.rate = p.opt.Max * 1.01
		p.applyRate()
		return
	}
	if p.intervalLo == 0 || rtt < p.intervalLo {
		p.intervalLo = rtt
	}
	if now.Sub(p.lastAdjust) < p.opt.Every {
		return
	}
	elapsed := now.Sub(p.lastAdjust)
	p.lastAdjust = now
	// The lowest sample of the interval: a delay only counts as a queue
	// when every sample of an interval (two probes at least) shows it, so
	// that one slow answer (a busy store, a loaded machine) is not taken
	// for one.
	lo := p.intervalLo
	p.intervalLo = 0
	read := p.read
	p.read = 0
	if p.bodies == 0 {
		p.clean = now
		return // nothing to pace: only the base is learned
	}
	if p.draining(now) {
		return
	}
	base := p.base.min(now)
	p.prevDelay, p.queueDelay = p.queueDelay, max(lo-base, 0)
	p.estimateLink(float64(read)/elapsed.Seconds(), elapsed)
	p.adjust()
}

// draining reports whether bodies are held back so that the base can be
// measured without this pacer's queue: it starts a drain once bodies have
// flowed for drainEvery, and ends it after drainFor (restoring the rate;
// the interval after it is read afresh).
func (p *Pacer) draining(now time.Time) bool {
	switch {
	case now.Before(p.drainUntil):
		return true
	case !p.drainUntil.IsZero():
		p.endDrain(now)
		return true
	case now.Sub(p.clean) >= drainEvery:
		p.drainUntil = now.Add(drainFor)
		p.lim.SetLimit(rate.Limit(p.opt.Floor))
		return true
	}
	return false
}

// endDrain restores the rate after a drain. Called by the adjustment that
// follows it and, should no sample arrive (a store that stopped answering
// the probes), by the bodies' own reads, so that a drain never outlasts
// drainFor by more than a read at Floor.
func (p *Pacer) endDrain(now time.Time) {
	p.drainUntil = time.Time{}
	p.clean = now
	p.queueDelay = 0
	p.applyRate()
}

// applyRate sets the limiter to the rate: unlimited past Max.
func (p *Pacer) applyRate() {
	if p.rate > p.opt.Max {
		p.lim.SetLimit(rate.Inf)
		return
	}
	p.lim.SetLimit(rate.Limit(p.rate))
}

// estimateLink updates the link's rate from what the bodies sent in the
// last interval (sent, bytes per second) and how the queue moved.
func (p *Pacer) estimateLink(sent float64, elapsed time.Duration) {
	standing := p.opt.Target / 10
	if p.queueDelay < standing || p.prevDelay < standing {
		// No queue: the link carried all that was sent, maybe more.
		p.linkRate = max(p.linkRate, sent)
		if p.slowStart && sent >= p.rate/2 {
			p.linkRate = max(p.linkRate, slowStartGain*p.rate) // the rate binds: try more
		}
		return
	}
	if p.slowStart {
		// The queue seen now began building some intervals ago (a probe
		// sees it only once through it), and the rate has grown since:
		// halve it, as TCP does when slow start ends.
		p.slowStart = false
		p.linkRate = p.rate / 2
		return
	}
	growth := float64(p.queueDelay-p.prevDelay) / float64(elapsed) // seconds of queue per second
	if growth < -0.5 {
		return // the queue drains because little was sent: says nothing of the link
	}
	sample := sent / min(1+growth, 2)
	p.linkRate = (1-smoothing)*p.linkRate + smoothing*sample
}

// adjust sets the rate to the link's, plus or minus what brings the
// queueing delay to Target within Drain.
func (p *Pacer) adjust() {
	correction := float64(p.opt.Target-p.queueDelay) / float64(p.opt.Drain)
	p.rate = p.linkRate * (1 + max(correction, -1))
	p.rate = max(p.rate, p.opt.Floor)
	if math.IsInf(p.rate, 1) || p.rate > p.opt.Max {
		p.rate = p.opt.Max * 1.01 // stays just past Max: unlimited, and comes back down on the first queue
	}
	p.applyRate()
}

// PaceStats is a snapshot of a pacer.
type PaceStats struct {
	Rate       float64       // bytes per second allowed to large bodies (> Max: unlimited)
	BaseRTT    time.Duration // the lowest round trip in the last ten minutes
	QueueDelay time.Duration // queueing delay read at the last adjustment
	Bodies     int           // large bodies being sent
}

// Stats returns the pacer's state.
func (p *Pacer) Stats() PaceStats {
	now := p.opt.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	return PaceStats{Rate: p.rate, BaseRTT: p.base.min(now), QueueDelay: p.queueDelay, Bodies: p.bodies}
}

// body returns r paced, and a function to call when it is no longer read.
// While any body is open, probe is called twice every Every and its
// round trip observed.
func (p *Pacer) body(ctx context.Context, r io.Reader, probe func(context.Context) error) (io.Reader, func()) {
	p.mu.Lock()
	p.bodies++
	if p.bodies == 1 && probe != nil {
		pctx, cancel := context.WithCancel(context.Background())
		p.stopProbe, p.probeDone = cancel, make(chan struct{})
		go p.probeLoop(pctx, probe, p.probeDone)
	}
	p.mu.Unlock()
	var once sync.Once
	done := func() {
		once.Do(func() {
			p.mu.Lock()
			p.bodies--
			var stop context.CancelFunc
			var stopped chan struct{}
			if p.bodies == 0 && p.stopProbe != nil {
				stop, stopped = p.stopProbe, p.probeDone
				p.stopProbe, p.probeDone = nil, nil
			}
			p.mu.Unlock()
			if stop != nil {
				stop()
				<-stopped
			}
		})
	}
	pr := pacedReader{ctx: ctx, r: r, p: p}
	if f, ok := r.(fileLike); ok {
		return &pacedFile{pacedReader: pr, f: f}, done
	}
	return &pr, done
}

// probeLoop starts a probe every Every/2 until ctx ends, without waiting
// for the ones before: a probe stuck in a long queue would otherwise stop
// the others that measure it draining.
func (p *Pacer) probeLoop(ctx context.Context, probe func(context.Context) error, done chan struct{}) {
	var wg sync.WaitGroup
	defer func() { wg.Wait(); close(done) }()
	slots := make(chan struct{}, maxProbes)
	t := time.NewTicker(p.opt.Every / 2)
	defer t.Stop()
	for {
		select {
		case slots <- struct{}{}:
			wg.Go(func() {
				defer func() { <-slots }()
				start := time.Now()
				if err := probe(ctx); err == nil {
					p.Observe(time.Since(start))
				}
			})
		default: // maxProbes already wait: skip this one
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

type fileLike interface {
	io.Reader
	io.ReaderAt
	io.Seeker
}

// wait takes n bytes' worth of the rate before a read of up to n bytes.
func (p *Pacer) wait(ctx context.Context, n int) error {
	return p.lim.WaitN(ctx, n)
}

// count records n bytes read (and so sent), for the link's estimate, and
// ends a drain that is due to end.
func (p *Pacer) count(n int) {
	p.mu.Lock()
	p.read += int64(n)
	if !p.drainUntil.IsZero() {
		if now := p.opt.Now(); !now.Before(p.drainUntil) {
			p.endDrain(now)
		}
	}
	p.mu.Unlock()
}

// pacedReader reads r no faster than its pacer allows.
type pacedReader struct {
	ctx context.Context
	r   io.Reader
	p   *Pacer
}

func (r *pacedReader) Read(b []byte) (int, error) {
	if len(b) > burst {
		b = b[:burst]
	}
	if err := r.p.wait(r.ctx, len(b)); err != nil {
		return 0, err
	}
	n, err := r.r.Read(b)
	r.p.count(n)
	return n, err
}

// pacedFile keeps a file's ReadAt and Seek (the S3 client seeks back to
// resend a body), pacing ReadAt as Read.
type pacedFile struct {
	pacedReader
	f fileLike
}

func (f *pacedFile) ReadAt(b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		chunk := b[n:min(len(b), n+burst)]
		if err := f.p.wait(f.ctx, len(chunk)); err != nil {
			return n, err
		}
		m, err := f.f.ReadAt(chunk, off+int64(n))
		f.p.count(m)
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (f *pacedFile) Seek(off int64, whence int) (int64, error) { return f.f.Seek(off, whence) }

// baseFilter is the lowest round trip of the last baseSpan, kept as the
// minimum of each of baseSlots slots.
type baseFilter struct {
	slots [baseSlots]struct {
		index int64
		lo    time.Duration
	}
}

func (f *baseFilter) add(now time.Time, rtt time.Duration) {
	idx := now.UnixNano() / int64(baseSpan/baseSlots)
	s := &f.slots[idx%baseSlots]
	if s.index != idx {
		s.index, s.lo = idx, rtt
		return
	}
	s.lo = min(s.lo, rtt)
}

func (f *baseFilter) min(now time.Time) time.Duration {
	idx := now.UnixNano() / int64(baseSpan/baseSlots)
	var lo time.Duration
	for _, s := range f.slots {
		if s.index > idx-baseSlots && s.index <= idx && (lo == 0 || s.lo < lo) {
			lo = s.lo
		}
	}
	return lo
}
