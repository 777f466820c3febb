package agent

import (
	"testing"
	"time"
)

// The breaker is tested on a fake clock: every method takes "now".
func TestBreaker(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := newBreaker(func(n int) time.Duration { return time.Duration(n) * 10 * time.Second })
	if probe, wait, _ := b.gate(t0); probe || wait != 0 {
		t.Fatal("a closed breaker holds workers back")
	}
	b.trip(t0, 0)
	b.trip(t0.Add(time.Second), 0) // a second failure in flight does not extend the pause
	if probe, wait, _ := b.gate(t0.Add(5 * time.Second)); probe || wait != 5*time.Second {
		t.Fatalf("gate during the pause = %v, %v; want wait 5s", probe, wait)
	}
	probe, _, _ := b.gate(t0.Add(10 * time.Second))
	if !probe {
		t.Fatal("no probe once the pause is over")
	}
	if p2, _, closed := b.gate(t0.Add(10 * time.Second)); p2 || closed == nil {
		t.Fatal("two workers probe at once")
	}
	b.probed(t0.Add(11*time.Second), false, 0)
	if probe, wait, _ := b.gate(t0.Add(11 * time.Second)); probe || wait != 20*time.Second {
		t.Fatalf("after a failed probe: %v, %v; want wait 20s (second backoff step)", probe, wait)
	}
	// Retry-After longer than the backoff wins.
	probe, _, _ = b.gate(t0.Add(31 * time.Second))
	if !probe {
		t.Fatal("no second probe")
	}
	b.probed(t0.Add(31*time.Second), false, time.Minute)
	if _, wait, _ := b.gate(t0.Add(31 * time.Second)); wait != time.Minute {
		t.Fatalf("Retry-After not honoured: wait %v", wait)
	}
	probe, _, closed := b.gate(t0.Add(92 * time.Second))
	_ = closed
	if !probe {
		t.Fatal("no third probe")
	}
	_, _, waiting := func() (bool, time.Duration, <-chan struct{}) { return b.gate(t0.Add(92 * time.Second)) }()
	b.probed(t0.Add(92*time.Second), true, 0)
	select {
	case <-waiting:
	default:
		t.Fatal("waiting workers were not woken when the breaker closed")
	}
	if probe, wait, _ := b.gate(t0.Add(93 * time.Second)); probe || wait != 0 || b.isOpen() {
		t.Fatal("breaker still open after a good probe")
	}
}

func TestBackoffGrowsAndIsCapped(t *testing.T) {
	a := &Agent{cfg: Config{BackoffInitial: time.Second, BackoffMax: time.Minute}}
	for attempt, base := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 4: 8 * time.Second, 30: time.Minute} {
		for i := 0; i < 20; i++ {
			d := a.backoff(attempt)
			if d < base/2 || d > base*3/2 || d > time.Minute {
				t.Fatalf("backoff(%d) = %v, want within ±50%% of %v and at most the 1m cap", attempt, d, base)
			}
		}
	}
}
