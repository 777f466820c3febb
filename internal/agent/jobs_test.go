package agent

import (
	"testing"
	"time"
)

// TestDropStopsUpload: dropping a job being uploaded cancels its upload,
// and the worker then records no outcome; a job dropped between its lease
// and the start of its upload does not start.
func TestDropStopsUpload(t *testing.T) {
	a := testAgent(t)
	a.queue.Enqueue([]string{"/p/1", "/p/2"}, "", time.Now())

	job, _ := a.queue.Lease(time.Now())
	ctx, finish := a.jobs.start(job)
	if _, err := a.queue.Drop(job.ID); err != nil {
		t.Fatal(err)
	}
	if !a.jobs.stopDropped(job.ID) {
		t.Fatal("stopDropped did not find the running job")
	}
	if ctx.Err() == nil {
		t.Fatal("the dropped job's upload context is not cancelled")
	}
	if !finish() {
		t.Fatal("finish did not report the drop")
	}
	// The drop is settled: the queue no longer expects an outcome.
	if err := a.queue.Release(job.ID); err == nil {
		t.Fatal("the dropped lease was not ended by finish")
	}

	job, _ = a.queue.Lease(time.Now())
	a.queue.Drop(job.ID)
	if a.jobs.stopDropped(job.ID) {
		t.Fatal("stopDropped found a job whose upload had not started")
	}
	ctx, finish = a.jobs.start(job)
	if ctx.Err() == nil || !finish() {
		t.Fatal("a job dropped before its upload started was uploaded")
	}
	if s, _ := a.queue.Stats(); s.Pending+s.Leased+s.Failed != 0 {
		t.Fatalf("stats = %+v", s)
	}
}
