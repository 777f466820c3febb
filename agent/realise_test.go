package agent

import (
	"slices"
	"testing"
	"time"

	"github.com/nixspool/nixspool/realisation"
)

// TestNotesRebuiltFromQueue: the derivations a queued path was requested
// for are noted again for the realisations after a restart.
func TestNotesRebuiltFromQueue(t *testing.T) {
	a := testAgent(t)
	const p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-out"
	const resolved, known = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x.drv", "/nix/store/cccccccccccccccccccccccccccccccc-x.drv"
	for _, drv := range []string{resolved, known} {
		if _, err := a.queue.Enqueue([]string{p}, drv, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	a.realiser = realisation.New(realisation.Options{}) // the notes of the previous run are gone
	if err := a.noteQueued(); err != nil {
		t.Fatal(err)
	}
	if got := a.realiser.Noted(p); !slices.Equal(got, []string{resolved, known}) {
		t.Fatalf("noted for %s: %v, want both derivations", p, got)
	}
}
