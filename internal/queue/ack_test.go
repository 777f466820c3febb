package queue

import (
	"path/filepath"
	"slices"
	"testing"
)

// TestAckKeepsDerivationsAddedDuringLease: a path requested for another
// derivation while its job was leased keeps a ready job for that
// derivation after the ack, durably (the request was acknowledged); a
// second ack, with nothing added, removes it.
func TestAckKeepsDerivationsAddedDuringLease(t *testing.T) {
	path := filepath.Join(t.TempDir(), "queue.db")
	q, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() }) // the queue open at the end
	const (
		p    = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-ca"
		drv1 = "/nix/store/cccccccccccccccccccccccccccccccc-ca-resolved.drv"
		drv2 = "/nix/store/dddddddddddddddddddddddddddddddd-ca.drv"
	)
	if _, err := q.Enqueue([]string{p}, drv1, t0); err != nil {
		t.Fatal(err)
	}
	j, err := q.Lease(t0)
	if err != nil || j == nil {
		t.Fatalf("lease: %v, %v", j, err)
	}
	if _, err := q.Enqueue([]string{p}, drv2, t0); err != nil {
		t.Fatal(err)
	}
	if err := q.Ack(j.ID, Totals{Paths: 1}); err != nil {
		t.Fatal(err)
	}
	if err := q.Check(); err != nil {
		t.Fatal(err)
	}
	// Durable: it is there after a reopen (as after kill -9).
	q.Close()
	if q, err = Open(path); err != nil {
		t.Fatal(err)
	}
	jobs, err := q.Lookup([]string{p})
	if err != nil {
		t.Fatal(err)
	}
	k, ok := jobs[p]
	if !ok {
		t.Fatal("the ack removed the only record of a derivation requested during the upload")
	}
	if got := k.Derivations(); !slices.Equal(got, []string{drv2}) || k.State != StateReady {
		t.Errorf("kept job: %s for %v, want ready for [%s]", k.State, got, drv2)
	}
	if s := mustStats(t, q); s.Uploaded != 1 || s.Pending != 1 {
		t.Errorf("stats after the ack: %+v", s)
	}
	j, err = q.Lease(t0)
	if err != nil || j == nil || j.ID != k.ID {
		t.Fatalf("lease of the kept job: %v, %v", j, err)
	}
	if err := q.Ack(j.ID, Totals{}); err != nil {
		t.Fatal(err)
	}
	if queued, err := q.Queued(p); err != nil || queued {
		t.Errorf("after the second ack: queued=%v, %v", queued, err)
	}
	if err := q.Check(); err != nil {
		t.Error(err)
	}
}
