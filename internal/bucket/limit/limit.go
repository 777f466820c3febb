// Package limit wraps a bucket so that the number of requests in flight
// adapts to what the store answers, as TCP's congestion window adapts to a
// network: slow start (one slot more per success) until the store first
// pushes back, then additive increase while requests succeed and the window
// is in use, and multiplicative decrease when the store throttles (HTTP
// 429, 503 SlowDown) or when latency shows requests queueing in front of
// it.
//
// With a distant bucket (100 ms round trips) many requests in flight pay off,
// and the window grows to the operator's maximum; a store that rate-limits
// shrinks it to what it accepts instead of being hammered. Every request of
// the uploader goes through one window, so a burst of small paths cannot
// open hundreds of connections at once.
package limit

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// Options bound the window.
type Options struct {
	Min, Max int // requests in flight; defaults 2 and 64
	Initial  int // default min(16, Max)
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
	// Pacer, if set, paces large bodies (parts, and puts of largeBody
	// bytes or more) by the queueing delay that small requests see.
	Pacer *Pacer
}

// Limiter is the adaptive window. It is safe for concurrent use.
type Limiter struct {
	opt   Options
	mu    sync.Mutex
	cond  *sync.Cond
	limit float64
	// ssthresh is where growth turns from slow start (one slot per
	// success: doubling per round trip) to congestion avoidance (one slot
	// per window): the window after the last decrease.
	ssthresh float64
	inflight int
	// Latency of small requests: the minimum over a sliding period is the
	// store's base round trip; a smoothed value far above it means queueing.
	minRTT      time.Duration
	minRTTAt    time.Time
	srtt        time.Duration
	lastDecr    time.Time
	throttles   uint64
	increases   uint64
	decreases   uint64
	maxInflight int
}

// New returns a limiter.
func New(opt Options) *Limiter {
	if opt.Min <= 0 {
		opt.Min = 2
	}
	if opt.Max < opt.Min {
		opt.Max = max(64, opt.Min)
	}
	if opt.Initial <= 0 {
		opt.Initial = min(16, opt.Max)
	}
	opt.Initial = min(max(opt.Initial, opt.Min), opt.Max)
	if opt.Now == nil {
		opt.Now = time.Now
	}
	l := &Limiter{opt: opt, limit: float64(opt.Initial), ssthresh: float64(opt.Max)}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// Acquire waits for a slot in the window (or ctx's end).
func (l *Limiter) Acquire(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inflight < int(l.limit) {
		l.take()
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// Wake this waiter when ctx ends: sync.Cond has no select.
	stop := context.AfterFunc(ctx, func() {
		l.mu.Lock()
		l.cond.Broadcast()
		l.mu.Unlock()
	})
	defer stop()
	for l.inflight >= int(l.limit) {
		if err := ctx.Err(); err != nil {
			return err
		}
		l.cond.Wait()
	}
	l.take()
	return nil
}

func (l *Limiter) take() {
	l.inflight++
	l.maxInflight = max(l.maxInflight, l.inflight)
}

// Outcome classifies a finished request for the window.
type Outcome int

// Outcomes.
const (
	OK        Outcome = iota // the store answered (success or an ordinary error)
	Throttled                // the store asked to slow down
	Failed                   // no answer (network) or local trouble: no signal
)

// Release returns a slot and adjusts the window. latency is only a signal
// for small requests (small is true), whose time is round trips, not bytes.
func (l *Limiter) Release(o Outcome, latency time.Duration, small bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight--
	now := l.opt.Now()
	switch o {
	case Throttled:
		l.throttles++
		l.decrease(now, 0.5)
	case OK:
		queueing := false
		if small && latency > 0 {
			queueing = l.observe(now, latency)
		}
		switch {
		case queueing:
			l.decrease(now, 0.9)
		case l.inflight+1 >= int(l.limit)*3/4:
			// The window is in use: grow, by one slot per success until
			// the store first pushes back (slow start), then by about one
			// slot per window's worth of successes.
			before := int(l.limit)
			step := 1 / l.limit
			if l.limit < l.ssthresh {
				step = 1
			}
			l.limit = math.Min(l.limit+step, float64(l.opt.Max))
			if int(l.limit) > before {
				l.increases++
			}
		}
	}
	l.cond.Broadcast()
}

// Throttled shrinks the window because the store asked to slow down, seen
// below the bucket (an HTTP answer that the S3 client then retried by
// itself, so that no error reaches the window).
func (l *Limiter) Throttled() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.throttles++
	l.decrease(l.opt.Now(), 0.5)
}

// observe records a small request's latency and reports whether requests
// queue: the smoothed latency is well above the base round trip.
func (l *Limiter) observe(now time.Time, rtt time.Duration) bool {
	if l.minRTT == 0 || rtt < l.minRTT || now.Sub(l.minRTTAt) > time.Minute {
		l.minRTT, l.minRTTAt = rtt, now
	}
	if l.srtt == 0 {
		l.srtt = rtt
	} else {
		l.srtt = (7*l.srtt + rtt) / 8
	}
	// Generous thresholds: a loaded machine adds noise to every latency.
	return l.srtt > 4*l.minRTT && l.srtt-l.minRTT > 200*time.Millisecond
}

// decrease shrinks the window by factor, at most once per round trip so
// that one burst of throttled answers counts as one signal.
func (l *Limiter) decrease(now time.Time, factor float64) {
	cool := max(l.srtt, 100*time.Millisecond)
	if now.Sub(l.lastDecr) < cool {
		return
	}
	l.lastDecr = now
	l.limit = math.Max(l.limit*factor, float64(l.opt.Min))
	l.ssthresh = l.limit
	l.decreases++
}

// Stats is a snapshot of the window.
type Stats struct {
	Limit, InFlight, MaxInFlight  int
	MinRTT, SmoothedRTT           time.Duration
	Throttles, Increases, Decreas uint64
}

// Stats returns the window's state.
func (l *Limiter) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{Limit: int(l.limit), InFlight: l.inflight, MaxInFlight: l.maxInflight, MinRTT: l.minRTT, SmoothedRTT: l.srtt,
		Throttles: l.throttles, Increases: l.increases, Decreas: l.decreases}
}

// outcome classifies a bucket error for the window.
func outcome(err error) Outcome {
	switch {
	case err == nil, bucket.IsNotExist(err), bucket.IsPrecondition(err), bucket.IsPermanent(err):
		return OK
	case bucket.IsThrottled(err):
		return Throttled
	case errors.Is(err, bucket.ErrUnavailable):
		// A 503 without a throttling code is still the store telling us
		// it is overloaded; a refused connection is not, but shrinking
		// the window then costs nothing (nothing gets through anyway).
		return Throttled
	}
	return Failed
}

// smallBody is the size below which a request's latency is round trips.
const smallBody = 64 << 10

// Wrap returns b with every request going through l. The result
// implements bucket.Multipart, bucket.BatchDeleter and bucket.Clock exactly
// when b does.
func Wrap(b bucket.Bucket, l *Limiter) bucket.Bucket {
	w := &Bucket{inner: b, l: l}
	mp, isMP := b.(bucket.Multipart)
	_, isBD := b.(bucket.BatchDeleter)
	switch {
	case isMP && isBD:
		return &multipartBatchBucket{multipartBucket{w, mp}}
	case isMP:
		return &multipartBucket{w, mp}
	case isBD:
		return &batchBucket{w}
	}
	return w
}

type batchBucket struct{ *Bucket }

func (b *batchBucket) DeleteMany(ctx context.Context, keys []string) error {
	return b.do(ctx, false, func() error { return b.inner.(bucket.BatchDeleter).DeleteMany(ctx, keys) })
}

// Bucket is a bucket.Bucket whose requests go through a Limiter.
type Bucket struct {
	inner bucket.Bucket
	l     *Limiter
}

// Unwrap returns the bucket inside.
func (b *Bucket) Unwrap() bucket.Bucket { return b.inner }

// Limiter returns the window requests go through.
func (b *Bucket) Limiter() *Limiter { return b.l }

func (b *Bucket) do(ctx context.Context, small bool, fn func() error) error {
	if err := b.l.Acquire(ctx); err != nil {
		return err
	}
	start := b.l.opt.Now()
	err := fn()
	took := b.l.opt.Now().Sub(start)
	o := outcome(err)
	b.l.Release(o, took, small)
	if small && o == OK && b.l.opt.Pacer != nil {
		b.l.opt.Pacer.Observe(took)
	}
	return err
}

// largeBody is the size from which a put's body is paced.
const largeBody = 1 << 20

// paced returns r through the pacer, if there is one, and a function to
// call once the request is over.
func (b *Bucket) paced(ctx context.Context, r io.Reader) (io.Reader, func()) {
	p := b.l.opt.Pacer
	if p == nil {
		return r, func() {}
	}
	return p.body(ctx, r, b.probe)
}

// localSHA256 returns the SHA-256 of the size bytes of a seekable r read
// from its start, rewound after; nil for a reader that cannot be read
// twice or a body of unknown size.
func localSHA256(r io.Reader, size int64) ([]byte, error) {
	rs, ok := r.(io.ReadSeeker)
	if !ok || size < 0 {
		return nil, nil
	}
	if start, err := rs.Seek(0, io.SeekCurrent); err != nil || start != 0 {
		return nil, nil
	}
	h := sha256.New()
	if n, err := io.Copy(h, io.LimitReader(rs, size)); err != nil || n != size {
		return nil, fmt.Errorf("hash body: %w: read %d of %d bytes: %v", bucket.ErrLocal, n, size, err)
	}
	if _, err := rs.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("rewind body: %w: %w", bucket.ErrLocal, err)
	}
	return h.Sum(nil), nil
}

// probe times a HEAD of the pacer's probe object, bypassing the window
// (it measures the way to the store, not the queue for slots).
func (b *Bucket) probe(ctx context.Context) error {
	_, err := b.inner.Stat(ctx, b.l.opt.Pacer.opt.ProbeKey)
	if bucket.IsNotExist(err) {
		return nil
	}
	return err
}

func (b *Bucket) String() string { return b.inner.String() }

// Now implements bucket.Clock.
func (b *Bucket) Now() time.Time { return bucket.Now(b.inner) }

// Stat implements bucket.Bucket.
func (b *Bucket) Stat(ctx context.Context, key string) (info bucket.Info, err error) {
	err = b.do(ctx, true, func() error { info, err = b.inner.Stat(ctx, key); return err })
	return info, err
}

// Put implements bucket.Bucket.
func (b *Bucket) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (info bucket.Info, err error) {
	if size < 0 || size >= largeBody {
		if b.l.opt.Pacer != nil && len(opts.SHA256) == 0 {
			// Without the body's SHA-256 an S3 store reads a single
			// request's body twice (a checksum, then the send), and the
			// pacer would charge both reads to the link: hash it here,
			// from the local copy, outside the pacer.
			if opts.SHA256, err = localSHA256(r, size); err != nil {
				return bucket.Info{}, fmt.Errorf("put %s: %w", key, err)
			}
		}
		// Paced from when it holds a slot: a body waiting for one sends
		// nothing, and counted as sending it would pull the link's
		// estimate down.
		err = b.do(ctx, false, func() error {
			pr, done := b.paced(ctx, r)
			defer done()
			info, err = b.inner.Put(ctx, key, pr, size, opts)
			return err
		})
		return info, err
	}
	err = b.do(ctx, size >= 0 && size < smallBody, func() error { info, err = b.inner.Put(ctx, key, r, size, opts); return err })
	return info, err
}

// Get implements bucket.Bucket.
func (b *Bucket) Get(ctx context.Context, key string, max int64) (data []byte, info bucket.Info, err error) {
	err = b.do(ctx, max < smallBody, func() error { data, info, err = b.inner.Get(ctx, key, max); return err })
	return data, info, err
}

// Open implements bucket.Bucket. The slot is held until the first byte
// arrives, not while the caller reads.
func (b *Bucket) Open(ctx context.Context, key string, offset, length int64) (rc io.ReadCloser, info bucket.Info, err error) {
	err = b.do(ctx, length >= 0 && length < smallBody, func() error { rc, info, err = b.inner.Open(ctx, key, offset, length); return err })
	return rc, info, err
}

// Delete implements bucket.Bucket.
func (b *Bucket) Delete(ctx context.Context, key string) error {
	return b.do(ctx, true, func() error { return b.inner.Delete(ctx, key) })
}

// List implements bucket.Bucket. The whole listing holds one slot.
func (b *Bucket) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	return b.do(ctx, false, func() error { return b.inner.List(ctx, opts, fn) })
}

type multipartBucket struct {
	*Bucket
	mp bucket.Multipart
}

func (b *multipartBucket) StartMultipart(ctx context.Context, key string, opts bucket.PutOptions) (id string, err error) {
	err = b.do(ctx, true, func() error { id, err = b.mp.StartMultipart(ctx, key, opts); return err })
	return id, err
}

func (b *multipartBucket) ListParts(ctx context.Context, key, uploadID string) (parts []bucket.Part, err error) {
	err = b.do(ctx, true, func() error { parts, err = b.mp.ListParts(ctx, key, uploadID); return err })
	return parts, err
}

func (b *multipartBucket) PutPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64, md5 []byte) (p bucket.Part, err error) {
	err = b.do(ctx, false, func() error {
		pr, done := b.paced(ctx, r) // from when it holds a slot, as Put
		defer done()
		p, err = b.mp.PutPart(ctx, key, uploadID, number, pr, size, md5)
		return err
	})
	return p, err
}

func (b *multipartBucket) CompleteMultipart(ctx context.Context, key, uploadID string, parts []bucket.Part) error {
	return b.do(ctx, true, func() error { return b.mp.CompleteMultipart(ctx, key, uploadID, parts) })
}

func (b *multipartBucket) AbortMultipart(ctx context.Context, key, uploadID string) error {
	return b.do(ctx, true, func() error { return b.mp.AbortMultipart(ctx, key, uploadID) })
}

func (b *multipartBucket) ListUploads(ctx context.Context, prefix string) (ups []bucket.Upload, err error) {
	err = b.do(ctx, false, func() error { ups, err = b.mp.ListUploads(ctx, prefix); return err })
	return ups, err
}

type multipartBatchBucket struct{ multipartBucket }

func (b *multipartBatchBucket) DeleteMany(ctx context.Context, keys []string) error {
	return b.do(ctx, false, func() error { return b.inner.(bucket.BatchDeleter).DeleteMany(ctx, keys) })
}
