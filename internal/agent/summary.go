package agent

import (
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/latency"
)

// timeToCacheSpan is the window of the time-to-cache percentiles in
// status.
const timeToCacheSpan = 15 * time.Minute

// timeToCache is the recent distribution of the time from a path's
// acknowledgement to its narinfo being in the cache: fifteen one-minute
// histograms, whatever the rate.
type timeToCache struct {
	once sync.Once
	w    *latency.Window
}

func (t *timeToCache) window() *latency.Window {
	t.once.Do(func() { t.w = latency.New(timeToCacheSpan, time.Minute) })
	return t.w
}

func (t *timeToCache) add(at time.Time, d time.Duration) { t.window().Add(at, d) }

func (t *timeToCache) stats(now time.Time) latency.Stats { return t.window().Stats(now) }

// rateWindow is the recent upload rate: completions over the last minute.
type rateWindow struct {
	mu     sync.Mutex
	events []rateEvent
}

type rateEvent struct {
	at    time.Time
	paths int
	bytes uint64
}

const rateSpan = time.Minute

func (r *rateWindow) add(at time.Time, paths int, bytes uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, rateEvent{at, paths, bytes})
	r.trim(at)
}

func (r *rateWindow) trim(now time.Time) {
	i := 0
	for i < len(r.events) && now.Sub(r.events[i].at) > rateSpan {
		i++
	}
	r.events = r.events[i:]
}

// rates returns paths/s and NAR bytes/s over the last minute (or since
// the first upload, if that is more recent).
func (r *rateWindow) rates(now time.Time, since time.Time) (float64, float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.trim(now)
	if len(r.events) == 0 {
		return 0, 0
	}
	span := min(rateSpan, now.Sub(since))
	if span < time.Second {
		span = time.Second
	}
	var paths int
	var bytes uint64
	for _, e := range r.events {
		paths += e.paths
		bytes += e.bytes
	}
	return float64(paths) / span.Seconds(), float64(bytes) / span.Seconds()
}
