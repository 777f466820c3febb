package agent

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestClosureQueuerIsBounded: derivations handed over by hooks are queued
// one at a time in order by one goroutine; past its capacity one is
// refused at once instead of starting a goroutine per hook; run ends with
// its context.
func TestClosureQueuerIsBounded(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var got []string
	running := 0
	maxRunning := 0
	q := newClosureQueuer(2, func(ctx context.Context, drv string) {
		mu.Lock()
		running++
		maxRunning = max(maxRunning, running)
		mu.Unlock()
		<-release
		mu.Lock()
		got = append(got, drv)
		running--
		mu.Unlock()
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { q.run(ctx); close(done) }()
	if !q.add("a") {
		t.Fatal("the first derivation was refused")
	}
	// Until run holds "a", the channel has room for two more.
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		r := running
		mu.Unlock()
		if r == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first derivation was not taken")
		}
		time.Sleep(time.Millisecond)
	}
	if !q.add("b") || !q.add("c") {
		t.Fatal("a derivation within the capacity was refused")
	}
	if q.add("d") {
		t.Fatal("a derivation past the capacity was taken")
	}
	close(release)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("queued %v, want a, b, c", got)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("run did not end with its context")
	}
	if !slices.Equal(got, []string{"a", "b", "c"}) || maxRunning != 1 {
		t.Fatalf("queued %v with up to %d at once, want a, b, c one at a time", got, maxRunning)
	}
}
