package queue

import (
	"encoding/json"
	"maps"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func TestSourcesCountedAndListed(t *testing.T) {
	q, _ := openTest(t)
	if _, err := q.Enqueue([]string{"/nix/store/h1", "/nix/store/h2"}, "", t0); err != nil {
		t.Fatal(err)
	}
	if _, err := q.EnqueueWith([]string{"/nix/store/c1", "/nix/store/h1"}, "", t0, EnqueueOptions{Source: SourceCapture}); err != nil {
		t.Fatal(err)
	}
	if _, err := q.EnqueueWith([]string{"/nix/store/p1"}, "", t0, EnqueueOptions{Source: SourcePush}); err != nil {
		t.Fatal(err)
	}
	// h1 keeps the source of its first request.
	want := map[Source]int{SourceHook: 2, SourceCapture: 1, SourcePush: 1}
	if got := mustStats(t, q).BySource; !maps.Equal(got, want) {
		t.Fatalf("by source = %v, want %v", got, want)
	}
	src := SourceCapture
	jobs, err := q.ListBy("", &src, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 1 || jobs[0].Path != "/nix/store/c1" || jobs[0].Source != SourceCapture {
		t.Fatalf("capture jobs = %+v", jobs)
	}
	// Leaving the queue (uploaded, dropped) uncounts the job.
	j, err := q.Lease(t0)
	if err != nil || j == nil {
		t.Fatal(j, err)
	}
	if err := q.Ack(j.ID, Totals{}); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Drop(jobs[0].ID); err != nil {
		t.Fatal(err)
	}
	want = map[Source]int{SourceHook: 1, SourcePush: 1}
	if got := mustStats(t, q).BySource; !maps.Equal(got, want) {
		t.Fatalf("after ack and drop: by source = %v, want %v", got, want)
	}
}

// A record written before sources were kept decodes as SourceUnknown, is
// counted as such, and leaves the queue without upsetting the counters.
func TestSourceOfOldRecords(t *testing.T) {
	q, _ := openTest(t)
	res, err := q.EnqueueWith([]string{"/nix/store/old"}, "", t0, EnqueueOptions{Source: SourcePush})
	if err != nil {
		t.Fatal(err)
	}
	// Rewrite the record as the previous version wrote it (no source
	// field), and its counter as it was (none).
	id := res[0].Job.ID
	if err := q.db.Update(func(tx *bolt.Tx) error {
		rec := map[string]any{"path": "/nix/store/old", "state": "ready", "enqueued_at": t0, "not_before": t0}
		b, _ := json.Marshal(rec)
		if err := tx.Bucket(bktJobs).Put(be64(id), append([]byte{recordVersion}, b...)); err != nil {
			return err
		}
		return tx.Bucket(bktMeta).Delete([]byte(cntSourcePfx + string(SourcePush)))
	}); err != nil {
		t.Fatal(err)
	}
	if err := q.Check(); err != nil {
		t.Fatal(err)
	}
	j, err := q.Get(id)
	if err != nil || j.Source != SourceUnknown || j.Source.String() != "unknown" {
		t.Fatalf("old record: %+v, %v", j, err)
	}
	if got := mustStats(t, q).BySource; !maps.Equal(got, map[Source]int{SourceUnknown: 1}) {
		t.Fatalf("by source = %v", got)
	}
	if _, err := q.Drop(id); err != nil {
		t.Fatal(err)
	}
	if got := mustStats(t, q).BySource; len(got) != 0 {
		t.Fatalf("by source after drop = %v", got)
	}
}

// A mark given with an enqueue commits with its jobs, also when every path
// is queued already.
func TestEnqueueMark(t *testing.T) {
	q, _ := openTest(t)
	if _, err := q.Enqueue([]string{"/nix/store/a"}, "", t0); err != nil {
		t.Fatal(err)
	}
	for i, v := range []string{"one", "two"} {
		if _, err := q.EnqueueWith([]string{"/nix/store/a"}, "", t0, EnqueueOptions{Source: SourceCapture, Mark: &Mark{Name: "cursor", Value: []byte(v)}}); err != nil {
			t.Fatal(err)
		}
		got, err := q.GetMark("cursor")
		if err != nil || string(got) != v {
			t.Fatalf("mark after enqueue %d = %q, %v", i, got, err)
		}
	}
	if got, _ := q.GetMark("other"); got != nil {
		t.Fatalf("absent mark = %q", got)
	}
}

func TestParseSource(t *testing.T) {
	for _, s := range Sources {
		got, err := ParseSource(s.String())
		if err != nil || got != s {
			t.Errorf("ParseSource(%q) = %q, %v", s.String(), got, err)
		}
	}
	if _, err := ParseSource("nope"); err == nil {
		t.Error("ParseSource(nope): no error")
	}
}
