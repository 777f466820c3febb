package uploader

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// generation is the cache generation rule, written once: which incarnation
// of the cache (its nix-cache-info object, see generationName) answers now,
// and when a question last confirmed it. Presence and the narinfo writes
// both consult it:
//   - every answer about the cache's contents is recorded under the counter
//     it was asked in, and dropped if the counter moved on meanwhile;
//   - a narinfo is written only once the generation it was planned in is
//     confirmed by a question sent after the last object it depends on was
//     written or found present (confirmAfter, then current);
//   - an upload counts as done only after one more such question, sent
//     after its last write (Uploader.settle).
type generation struct {
	// counter counts resets seen by this process; answers about the cache
	// belong to the counter they were asked in.
	counter atomic.Uint64
	// check asks the cache for its generation (a real round trip); its
	// answer is recorded through observe.
	check func(context.Context) error
	// every bounds how long uploads go on without a confirmation
	// (Options.GenerationCheck).
	every time.Duration

	mu   sync.Mutex
	name string // generation name of the cache, "" until first seen
	// born is the LastModified of the generation's nix-cache-info (the
	// store's clock): when the cache was created or last reset.
	born time.Time
	// confirmed is when the last question that found the current name was
	// sent.
	confirmed time.Time
}

// current is the generation counter.
func (g *generation) current() uint64 { return g.counter.Load() }

// advance moves the counter on: everything known of the cache is to be
// forgotten (an operator asked, or nix-cache-info is gone).
func (g *generation) advance() { g.counter.Add(1) }

// observe records name, answered by a question sent at asked. If it
// differs from a known name the counter moves on and forget runs before
// the new name and its confirmation are published, in one critical
// section: an answer of the old generation then fails its counter check,
// and whoever sees the confirmation sees the new counter. Callers may hold
// their own lock around it (it is taken before g.mu, never after). It
// returns the name known before ("" if none).
func (g *generation) observe(name string, asked time.Time, forget func()) (old string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	old = g.name
	if old == name {
		if asked.After(g.confirmed) {
			g.confirmed = asked
		}
		return old
	}
	if old != "" {
		g.counter.Add(1)
		forget()
	}
	g.confirmed = asked
	g.name = name
	return old
}

// setBorn records when the current generation's nix-cache-info was written.
func (g *generation) setBorn(t time.Time) {
	g.mu.Lock()
	g.born = t
	g.mu.Unlock()
}

// bornWithin reports whether the cache was created or reset less than d
// ago (storeNow: the store's clock).
func (g *generation) bornWithin(storeNow time.Time, d time.Duration) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return !g.born.IsZero() && storeNow.Sub(g.born) < d
}

// currentName is the generation name ("" until first seen).
func (g *generation) currentName() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.name
}

// confirmedSince reports whether the generation was confirmed by a
// question sent at or after t.
func (g *generation) confirmedSince(t time.Time) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return !g.confirmed.Before(t)
}

// age is how long ago the generation was last confirmed.
func (g *generation) age() time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.confirmed.IsZero() {
		return time.Duration(1<<62 - 1)
	}
	return time.Since(g.confirmed)
}

// due reports whether the generation was not confirmed within every:
// uploads ask again before they go on.
func (g *generation) due() bool { return g.age() > g.every }

// confirmAfter returns once the cache's generation was confirmed by a
// question sent at or after t (it asks if no such answer is known, or
// joins a question in flight), or an error. If the answer shows a reset,
// the counter moves on: callers compare it.
func (g *generation) confirmAfter(ctx context.Context, t time.Time) error {
	for i := 0; !g.confirmedSince(t); i++ {
		if i == 3 {
			return fmt.Errorf("the cache's generation could not be confirmed: %w", errReset)
		}
		if err := g.check(ctx); err != nil {
			return err
		}
	}
	return nil
}
