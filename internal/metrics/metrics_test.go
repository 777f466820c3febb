package metrics

import (
	"maps"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

// pinned are agentd's metrics as dashboards and alerts know them: name,
// type and label names. A rename, a type change or a label change fails
// TestMetricNamesPinned; change this list only with docs/operations.md,
// "Metrics" (and a note for users) when it is meant.
var pinned = map[string]string{
	"nixspool_enqueue_duration_seconds":      "HISTOGRAM",
	"nixspool_errors_total":                  "COUNTER{class}",
	"nixspool_gc_deleted_bytes_total":        "COUNTER",
	"nixspool_gc_deleted_objects_total":      "COUNTER{kind}",
	"nixspool_gc_last_run_duration_seconds":  "GAUGE",
	"nixspool_gc_last_run_timestamp_seconds": "GAUGE",
	"nixspool_gc_lease_conflicts_total":      "COUNTER",
	"nixspool_gc_requests_total":             "COUNTER{kind}",
	"nixspool_gc_runs_total":                 "COUNTER{result}",
	"nixspool_gc_upload_refusals_total":      "COUNTER",
	"nixspool_jobs_failed":                   "GAUGE",
	"nixspool_jobs_pending":                  "GAUGE",
	"nixspool_jobs_queued":                   "GAUGE{source}",
	"nixspool_jobs_retrying":                 "GAUGE",
	"nixspool_jobs_uploading":                "GAUGE",
	"nixspool_oldest_pending_seconds":        "GAUGE",
	"nixspool_operator_actions_total":        "COUNTER{op,outcome}",
	"nixspool_queue_commits_total":           "COUNTER",
	"nixspool_queued_paths_total":            "COUNTER{source}",
	"nixspool_realisations_uploaded_total":   "COUNTER",
	"nixspool_skipped_paths_total":           "COUNTER",
	"nixspool_time_to_cache_seconds":         "HISTOGRAM",
	"nixspool_upload_bytes_total":            "COUNTER{kind}",
	"nixspool_upload_duration_seconds":       "HISTOGRAM{result}",
	"nixspool_uploads_total":                 "COUNTER{result}",
}

// TestMetricNamesPinned records something in every metric (a vector shows
// only once it has a series) and compares what a scrape would show with
// pinned.
func TestMetricNamesPinned(t *testing.T) {
	m := New(func() (Snapshot, error) {
		return Snapshot{Pending: 1, BySource: map[string]int{"hook": 1}, Commits: 3}, nil
	})
	m.Enqueued(time.Millisecond)
	m.Queued("hook", 1)
	m.Uploaded(time.Second, 10, 5, 1)
	m.TimeToCache(time.Second)
	m.Realisations(1)
	m.Failed(time.Second, "retry", "transient")
	m.GCRun("complete", time.Now(), time.Second, map[string]int{"narinfo": 1}, 10, map[string]int64{"list": 1})
	m.GCLeaseConflict()
	m.GCRefusal()
	m.OperatorAction("gc", "ok")

	families, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, f := range families {
		if !strings.HasPrefix(f.GetName(), "nixspool_") {
			continue // the Go and process collectors
		}
		got[f.GetName()] = describe(f)
	}
	for _, name := range slices.Sorted(maps.Keys(pinned)) {
		switch g, ok := got[name]; {
		case !ok:
			t.Errorf("%s (%s) is gone: renamed or unregistered?", name, pinned[name])
		case g != pinned[name]:
			t.Errorf("%s is %s, pinned as %s", name, g, pinned[name])
		}
	}
	for _, name := range slices.Sorted(maps.Keys(got)) {
		if _, ok := pinned[name]; !ok {
			t.Errorf("%s (%s) is not pinned: add it here and to docs/operations.md, \"Metrics\"", name, got[name])
		}
	}
}

// describe is a family's type and label names: "COUNTER{kind}".
func describe(f *dto.MetricFamily) string {
	labels := map[string]bool{}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = true
		}
	}
	s := f.GetType().String()
	if len(labels) > 0 {
		names := slices.Collect(maps.Keys(labels))
		sort.Strings(names)
		s += "{" + strings.Join(names, ",") + "}"
	}
	return s
}
