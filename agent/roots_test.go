package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nixspool/nixspool/queue"
)

// TestUnrootKeepsRequeuedPath: the GC root removal that follows an ack
// (it runs once the ack is durable) leaves the root alone when the path
// was queued again meanwhile: the new request found the old job's root in
// place and made none of its own.
func TestUnrootKeepsRequeuedPath(t *testing.T) {
	a := testAgent(t)
	p := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-again"
	link := filepath.Join(a.roots.Dir(), filepath.Base(p))
	if err := a.roots.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.queue.Enqueue([]string{p}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v %v", job, err)
	}
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	// A new request for the path, before the ack's root removal runs.
	if err := a.roots.AddAll([]string{p}); err != nil {
		t.Fatal(err)
	}
	res, err := a.queue.Enqueue([]string{p}, "", time.Now())
	if err != nil || !res[0].New {
		t.Fatalf("enqueue again: %+v %v", res, err)
	}
	if err := a.unroot(p); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); err != nil {
		t.Fatalf("root of a queued path removed by the previous job's ack: %v", err)
	}

	// Once the path's last job is gone, its root goes too.
	job, _ = a.queue.Lease(time.Now())
	if err := a.queue.Ack(job.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	if err := a.unroot(p); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(link); !os.IsNotExist(err) {
		t.Fatalf("root of an uploaded path kept: %v", err)
	}
}
