package queue

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestWantedLeasedFirst: a job someone waits for is leased before every
// other due job, oldest waited-for first; a job backing off is not hurried;
// a lapsed mark and a mark on a job that is gone are forgotten.
func TestWantedLeasedFirst(t *testing.T) {
	q, _ := openTest(t)
	var paths []string
	for i := range 1000 {
		paths = append(paths, fmt.Sprintf("/nix/store/p%04d", i))
	}
	res, err := q.Enqueue(paths, "", t0)
	if err != nil {
		t.Fatal(err)
	}
	id := func(i int) uint64 { return res[i].Job.ID }
	now := t0.Add(time.Second)

	// 900 is backing off: waiting for it does not make it due.
	j, _ := q.Lease(now)
	if j.ID != id(0) {
		t.Fatalf("first lease = %d, want the oldest job %d", j.ID, id(0))
	}
	q.Release(j.ID)
	moveToBackoff(t, q, id(900), now)

	q.Want([]uint64{id(950), id(900), id(700)}, now.Add(10*time.Second))
	if n := q.Wanted(now); n != 3 {
		t.Fatalf("Wanted = %d, want 3", n)
	}
	for _, want := range []int{700, 950, 0} {
		j, err := q.Lease(now)
		if err != nil || j == nil {
			t.Fatalf("lease: %v, %v", j, err)
		}
		if j.ID != id(want) {
			t.Fatalf("leased job %d (%s), want %d (%s)", j.ID, j.Path, id(want), paths[want])
		}
	}
	// Done: its mark goes at the next lease.
	if err := q.Ack(id(700), Totals{}); err != nil {
		t.Fatal(err)
	}
	q.Lease(now)
	if n := q.Wanted(now); n != 2 { // 950 (leased) and 900 (backing off)
		t.Fatalf("Wanted after the ack = %d, want 2", n)
	}
	// A mark that is not renewed lapses: 500 is not hurried then.
	q.Want([]uint64{id(500)}, now.Add(time.Second))
	later := now.Add(2 * time.Second)
	j, _ = q.Lease(later)
	if j.ID == id(500) {
		t.Fatal("a lapsed mark still hurried its job")
	}
	// Once due, the job backing off comes first.
	q.Want([]uint64{id(900)}, now.Add(2*time.Hour))
	if j, _ = q.Lease(now.Add(time.Hour)); j.ID != id(900) {
		t.Fatalf("leased %d, want the waited-for job 900 once its backoff is over", j.ID)
	}
}

func moveToBackoff(t *testing.T, q *Queue, id uint64, now time.Time) {
	t.Helper()
	// Lease it (the oldest jobs are leased and released around it).
	var held []uint64
	for {
		j, err := q.Lease(now)
		if err != nil || j == nil {
			t.Fatalf("lease: %v, %v", j, err)
		}
		if j.ID == id {
			break
		}
		held = append(held, j.ID)
	}
	if err := q.RetryLater(id, now.Add(30*time.Minute), "slow", now); err != nil {
		t.Fatal(err)
	}
	for _, h := range held {
		q.Release(h)
	}
}

// TestLookup: jobs by path, leased state included; unknown paths absent.
func TestLookup(t *testing.T) {
	q, _ := openTest(t)
	q.Enqueue([]string{"/nix/store/a", "/nix/store/b"}, "", t0)
	j, _ := q.Lease(t0)
	got, err := q.Lookup([]string{"/nix/store/a", "/nix/store/b", "/nix/store/c"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[j.Path].State != StateLeased || got["/nix/store/b"].State != StateReady {
		t.Fatalf("lookup = %+v", got)
	}
}

// TestWantedBackingOffReadOnce: a lease does not read again the
// waited-for jobs it found backing off: with W of them, leasing N other
// jobs reads about W jobs, not N×W.
func TestWantedBackingOffReadOnce(t *testing.T) {
	q, _ := openTest(t)
	const w, n = 500, 50
	var slow, other []string
	for i := range w {
		slow = append(slow, fmt.Sprintf("/nix/store/slow%04d", i))
	}
	for i := range n {
		other = append(other, fmt.Sprintf("/nix/store/other%04d", i))
	}
	res, err := q.Enqueue(slow, "", t0)
	if err != nil {
		t.Fatal(err)
	}
	now := t0.Add(time.Second)
	var ids []uint64
	for range w {
		j, err := q.Lease(now)
		if err != nil || j == nil {
			t.Fatalf("lease: %v, %v", j, err)
		}
		if err := q.RetryLater(j.ID, now.Add(time.Hour), "slow", now); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range res {
		ids = append(ids, r.Job.ID)
	}
	if _, err := q.Enqueue(other, "", now); err != nil {
		t.Fatal(err)
	}
	q.Want(ids, now.Add(time.Minute))
	for range n {
		j, err := q.Lease(now)
		if err != nil || j == nil {
			t.Fatalf("lease: %v, %v", j, err)
		}
		if !strings.HasPrefix(j.Path, "/nix/store/other") {
			t.Fatalf("leased %s, which is backing off", j.Path)
		}
	}
	q.mu.Lock()
	reads := q.wantedReads
	q.mu.Unlock()
	if reads > w {
		t.Errorf("%d leases read %d waited-for jobs backing off; want at most %d (each once)", n, reads, w)
	}
	// Once the backoff is over, they are hurried again.
	q.Want(ids, now.Add(3*time.Hour))
	if j, _ := q.Lease(now.Add(2 * time.Hour)); j == nil || j.ID != ids[0] {
		t.Fatalf("after the backoff leased %v, want the oldest waited-for job %d", j, ids[0])
	}
}
