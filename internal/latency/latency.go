// Package latency keeps the recent distribution of a duration (agentd's
// time to cache) in bounded memory, whatever the rate of samples: one
// histogram of logarithmic buckets per minute, in a ring that covers the
// window. A percentile is read from the histograms of the minutes still in
// the window, to within the width of a bucket (about 4.5%).
package latency

import (
	"math"
	"sync"
	"time"
)

const (
	// perDoubling buckets split every doubling of the duration: a bucket
	// is 2^(1/8) ≈ 9% wide, so its middle is within 4.5% of any sample in it.
	perDoubling = 8
	// buckets cover minSample … minSample·2^30 (1 ms … about 12 days);
	// shorter samples count in the first bucket, longer ones in the last.
	buckets   = 30 * perDoubling
	minSample = time.Millisecond
)

// Window is the distribution of the samples of the last span (counted in
// whole slots). Its methods are safe for concurrent use.
type Window struct {
	mu    sync.Mutex
	slot  time.Duration
	ring  []slot
	nSlot int64 // slots in the window
}

type slot struct {
	index  int64 // time since the epoch in slots; which minute this holds
	n      uint64
	counts [buckets]uint32
}

// New returns a window of span, made of slots of slot each (span is
// rounded up to whole slots). New(15*time.Minute, time.Minute) keeps
// fifteen histograms of about 1 kB.
func New(span, slotLen time.Duration) *Window {
	n := int64((span + slotLen - 1) / slotLen)
	return &Window{slot: slotLen, ring: make([]slot, n), nSlot: n}
}

// Add records a sample d taken at at.
func (w *Window) Add(at time.Time, d time.Duration) {
	idx := at.UnixNano() / int64(w.slot)
	w.mu.Lock()
	defer w.mu.Unlock()
	s := &w.ring[idx%w.nSlot]
	if s.index != idx {
		if s.index > idx {
			return // older than the window (a clock step back)
		}
		*s = slot{index: idx}
	}
	s.counts[bucketOf(d)]++
	s.n++
}

// Stats summarises the samples of the window that ends at now.
type Stats struct {
	N   uint64        // samples in the window
	P50 time.Duration // 0 when N is 0
	P99 time.Duration
}

// Stats returns the count, median and 99th percentile of the samples in
// the window ending at now.
func (w *Window) Stats(now time.Time) Stats {
	var sum [buckets]uint64
	var n uint64
	idx := now.UnixNano() / int64(w.slot)
	w.mu.Lock()
	for i := range w.ring {
		s := &w.ring[i]
		if s.n == 0 || s.index > idx || s.index <= idx-w.nSlot {
			continue
		}
		n += s.n
		for b, c := range s.counts {
			sum[b] += uint64(c)
		}
	}
	w.mu.Unlock()
	if n == 0 {
		return Stats{}
	}
	return Stats{N: n, P50: quantile(&sum, n, 0.50), P99: quantile(&sum, n, 0.99)}
}

// quantile returns the middle of the bucket that holds the sample of rank
// ⌈q·n⌉.
func quantile(sum *[buckets]uint64, n uint64, q float64) time.Duration {
	rank := uint64(math.Ceil(q * float64(n)))
	rank = max(rank, 1)
	var seen uint64
	for b, c := range sum {
		seen += c
		if seen >= rank {
			return middle(b)
		}
	}
	return middle(buckets - 1)
}

func bucketOf(d time.Duration) int {
	if d <= minSample {
		return 0
	}
	b := int(math.Log2(float64(d)/float64(minSample)) * perDoubling)
	return min(max(b, 0), buckets-1)
}

// middle is the geometric middle of bucket b.
func middle(b int) time.Duration {
	return time.Duration(float64(minSample) * math.Exp2((float64(b)+0.5)/perDoubling))
}
