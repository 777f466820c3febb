package agent

import (
	"sync"
	"time"
)

// breaker stops the workers from hammering a bucket that is down. When an
// upload fails because the bucket is unavailable, the breaker opens: no job
// is leased until the next probe time, and then exactly one worker probes
// the bucket. A good probe closes the breaker and every due job resumes; a
// failed one pushes the next probe further out (exponential backoff).
type breaker struct {
	mu        sync.Mutex
	open      bool
	failures  int
	nextProbe time.Time
	probing   bool
	backoff   func(attempt int) time.Duration
	closed    chan struct{} // closed (and replaced) whenever the breaker closes
}

func newBreaker(backoff func(int) time.Duration) *breaker {
	return &breaker{backoff: backoff, closed: make(chan struct{})}
}

// trip opens the breaker (or keeps it open) after a failure at now; a
// server-requested delay (Retry-After) is honoured if it is longer.
func (b *breaker) trip(now time.Time, retryAfter time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.open && b.nextProbe.After(now) {
		return // a concurrent upload already tripped it
	}
	b.open = true
	b.failures++
	b.nextProbe = now.Add(max(b.backoff(b.failures), retryAfter))
}

// gate tells a worker what to do at now: proceed (breaker closed), probe
// (this worker won the probe), or wait up to the returned duration.
func (b *breaker) gate(now time.Time) (probe bool, wait time.Duration, closed <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case !b.open:
		return false, 0, nil
	case b.probing:
		return false, time.Minute, b.closed
	case now.Before(b.nextProbe):
		return false, b.nextProbe.Sub(now), b.closed
	default:
		b.probing = true
		return true, 0, nil
	}
}

// probed records the outcome of the probe a worker was told to make.
func (b *breaker) probed(now time.Time, ok bool, retryAfter time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
	if ok {
		b.open, b.failures = false, 0
		close(b.closed)
		b.closed = make(chan struct{})
		return
	}
	b.failures++
	b.nextProbe = now.Add(max(b.backoff(b.failures), retryAfter))
}

// isOpen reports whether uploads are paused.
func (b *breaker) isOpen() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.open
}

// pausedUntil returns when the next probe is due, if uploads are paused.
func (b *breaker) pausedUntil() (time.Time, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.nextProbe, b.open
}
