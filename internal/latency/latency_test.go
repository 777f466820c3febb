package latency

import (
	"testing"
	"time"
)

func within(got, want time.Duration, rel float64) bool {
	d := float64(got - want)
	if d < 0 {
		d = -d
	}
	return d <= rel*float64(want)
}

// TestPercentiles: the median and the 99th percentile of a known
// distribution are read to within a bucket's width.
func TestPercentiles(t *testing.T) {
	w := New(15*time.Minute, time.Minute)
	now := time.Unix(1_700_000_000, 0)
	for i := 1; i <= 1000; i++ {
		w.Add(now, time.Duration(i)*time.Millisecond)
	}
	s := w.Stats(now)
	if s.N != 1000 {
		t.Fatalf("N = %d, want 1000", s.N)
	}
	if !within(s.P50, 500*time.Millisecond, 0.05) {
		t.Errorf("p50 = %v, want about 500ms", s.P50)
	}
	if !within(s.P99, 990*time.Millisecond, 0.05) {
		t.Errorf("p99 = %v, want about 990ms", s.P99)
	}
	// One slow sample in a hundred sets the p99, not the median.
	w = New(15*time.Minute, time.Minute)
	for i := 0; i < 98; i++ {
		w.Add(now, 100*time.Millisecond)
	}
	w.Add(now, time.Minute)
	w.Add(now, time.Minute)
	s = w.Stats(now)
	if !within(s.P50, 100*time.Millisecond, 0.05) || !within(s.P99, time.Minute, 0.05) {
		t.Errorf("stats = %+v, want p50 about 100ms and p99 about 1m", s)
	}
}

// TestWindowSpan: samples leave the window once they are older than the
// span, and a slot of the ring is reused for a later minute.
func TestWindowSpan(t *testing.T) {
	w := New(15*time.Minute, time.Minute)
	t0 := time.Unix(1_700_000_000, 0).Truncate(time.Minute)
	w.Add(t0, time.Second)
	w.Add(t0.Add(5*time.Minute), 3*time.Second)
	if s := w.Stats(t0.Add(10 * time.Minute)); s.N != 2 {
		t.Fatalf("after 10 minutes: N = %d, want 2", s.N)
	}
	s := w.Stats(t0.Add(15 * time.Minute))
	if s.N != 1 || !within(s.P50, 3*time.Second, 0.05) {
		t.Fatalf("after 15 minutes: %+v, want only the 3s sample", s)
	}
	// 15 minutes later the first sample's slot holds the new minute only.
	w.Add(t0.Add(15*time.Minute), 10*time.Second)
	s = w.Stats(t0.Add(15 * time.Minute))
	if s.N != 2 || !within(s.P99, 10*time.Second, 0.05) {
		t.Fatalf("after reuse: %+v, want the 3s and 10s samples", s)
	}
	if s := w.Stats(t0.Add(time.Hour)); s != (Stats{}) {
		t.Fatalf("an hour later: %+v, want nothing", s)
	}
	// A sample from before the window (a clock step back) is ignored.
	w.Add(t0, time.Hour)
	if s := w.Stats(t0.Add(15 * time.Minute)); s.N != 2 {
		t.Fatalf("a stale sample was counted: %+v", s)
	}
}

// TestExtremes: samples outside the buckets' range count in the first or
// last bucket instead of being lost.
func TestExtremes(t *testing.T) {
	w := New(time.Minute, time.Minute)
	now := time.Unix(1_700_000_000, 0)
	w.Add(now, 0)
	w.Add(now, -time.Second)
	w.Add(now, 100*24*time.Hour)
	s := w.Stats(now)
	if s.N != 3 || s.P50 > 2*time.Millisecond || s.P99 < 24*time.Hour {
		t.Fatalf("stats = %+v", s)
	}
}

func BenchmarkAdd(b *testing.B) {
	w := New(15*time.Minute, time.Minute)
	now := time.Now()
	for i := 0; b.Loop(); i++ {
		w.Add(now, time.Duration(i)*time.Microsecond)
	}
}
