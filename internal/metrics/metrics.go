// Package metrics is agentd's optional Prometheus endpoint: queue gauges
// read from the queue on every scrape, and counters and histograms of
// enqueues, uploads and errors.
package metrics

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Snapshot is the queue state a scrape reports.
type Snapshot struct {
	Pending, Uploading, Retrying, Failed int
	OldestPending                        time.Duration
	// BySource counts the queued jobs (any state) by where their paths
	// came from (hook, push, capture, build-closure, unknown).
	BySource map[string]int
	// Commits is how many queue transactions have been committed (each
	// one round of fsyncs, shared by the operations it carried).
	Commits uint64
}

// bySource reports the jobs_queued gauge, one series per source.
type bySource struct {
	desc     *prometheus.Desc
	snapshot func() (Snapshot, error)
}

func (c *bySource) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *bySource) Collect(ch chan<- prometheus.Metric) {
	s, err := c.snapshot()
	if err != nil {
		return
	}
	for src, n := range s.BySource {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), src)
	}
}

// Metrics holds agentd's collectors. A nil *Metrics records nothing, so
// callers need not check whether metrics are enabled.
type Metrics struct {
	reg        *prometheus.Registry
	uploads    *prometheus.CounterVec
	bytes      *prometheus.CounterVec
	errors     *prometheus.CounterVec
	skipped    prometheus.Counter
	reals      prometheus.Counter
	enqueueDur prometheus.Histogram
	queued     *prometheus.CounterVec
	uploadDur  *prometheus.HistogramVec
	ttc        prometheus.Histogram

	gcRuns      *prometheus.CounterVec
	gcDeleted   *prometheus.CounterVec
	gcBytes     prometheus.Counter
	gcRequests  *prometheus.CounterVec
	gcLastRun   prometheus.Gauge
	gcLastDur   prometheus.Gauge
	gcConflicts prometheus.Counter
	gcRefusals  prometheus.Counter

	operator *prometheus.CounterVec
}

// New registers the collectors; snapshot is called on every scrape for
// the queue gauges.
func New(snapshot func() (Snapshot, error)) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.uploads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_uploads_total", Help: "Jobs finished, by result (uploaded, retry, failed).",
	}, []string{"result"})
	m.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_upload_bytes_total", Help: "Bytes of uploaded paths, by kind (nar: uncompressed, file: sent).",
	}, []string{"kind"})
	m.errors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_errors_total", Help: "Upload errors, by class (transient, unavailable, permanent).",
	}, []string{"class"})
	m.skipped = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixspool_skipped_paths_total", Help: "Paths not uploaded because of a filter.",
	})
	m.queued = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_queued_paths_total", Help: "Paths handed to the queue (new or queued already), by source (hook, push, capture, build-closure).",
	}, []string{"source"})
	m.reals = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixspool_realisations_uploaded_total", Help: "Realisation objects (.doi, content-addressed derivations) written.",
	})
	m.enqueueDur = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "nixspool_enqueue_duration_seconds", Help: "Time from a hook's request to its durable acknowledgement.",
		Buckets: prometheus.ExponentialBuckets(0.0002, 2, 14),
	})
	m.uploadDur = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "nixspool_upload_duration_seconds", Help: "Time to upload one job (its path and missing closure), by result.",
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 16),
	}, []string{"result"})
	m.ttc = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "nixspool_time_to_cache_seconds", Help: "Time from a path's acknowledgement (hook or push) to its narinfo being in the cache.",
		Buckets: prometheus.ExponentialBuckets(0.01, 2, 20),
	})
	m.gcRuns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_gc_runs_total", Help: "Garbage collection cycles run by this agent, by result (complete, incomplete, failed, dry_run, refused).",
	}, []string{"result"})
	m.gcDeleted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_gc_deleted_objects_total", Help: "Objects deleted by garbage collection, by kind (narinfo, nar, other, upload).",
	}, []string{"kind"})
	m.gcBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixspool_gc_deleted_bytes_total", Help: "Bytes of the objects deleted by garbage collection.",
	})
	m.gcRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_gc_requests_total", Help: "Requests made by garbage collection, by kind (list, get, head, put, delete).",
	}, []string{"kind"})
	m.gcLastRun = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "nixspool_gc_last_run_timestamp_seconds", Help: "When the last garbage collection cycle of this agent ended (Unix time).",
	})
	m.gcLastDur = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "nixspool_gc_last_run_duration_seconds", Help: "How long the last garbage collection cycle of this agent took.",
	})
	m.gcConflicts = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixspool_gc_lease_conflicts_total", Help: "Cycles refused because another collector held the bucket's lease.",
	})
	m.gcRefusals = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nixspool_gc_upload_refusals_total", Help: "Narinfo writes held back because an object they rely on is being garbage-collected.",
	})
	m.operator = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nixspool_operator_actions_total", Help: "Operators' requests (gc, forget, drop, retry, pin, unpin), by operation and outcome (ok, failed, refused).",
	}, []string{"op", "outcome"})
	m.reg.MustRegister(m.operator)
	m.reg.MustRegister(m.gcRuns, m.gcDeleted, m.gcBytes, m.gcRequests, m.gcLastRun, m.gcLastDur, m.gcConflicts, m.gcRefusals)
	gauge := func(name, help string, v func(Snapshot) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 {
			s, err := snapshot()
			if err != nil {
				return 0
			}
			return v(s)
		})
	}
	m.reg.MustRegister(m.queued, &bySource{snapshot: snapshot, desc: prometheus.NewDesc("nixspool_jobs_queued",
		"Jobs in the queue (pending, uploading, retrying, failed), by where their paths came from.", []string{"source"}, nil)})
	m.reg.MustRegister(m.uploads, m.bytes, m.errors, m.skipped, m.reals, m.enqueueDur, m.uploadDur, m.ttc,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		gauge("nixspool_jobs_pending", "Jobs waiting for their first attempt.", func(s Snapshot) float64 { return float64(s.Pending) }),
		gauge("nixspool_jobs_uploading", "Jobs being uploaded.", func(s Snapshot) float64 { return float64(s.Uploading) }),
		gauge("nixspool_jobs_retrying", "Jobs waiting to be retried.", func(s Snapshot) float64 { return float64(s.Retrying) }),
		gauge("nixspool_jobs_failed", "Jobs in the dead letter (agentctl list --state failed).", func(s Snapshot) float64 { return float64(s.Failed) }),
		gauge("nixspool_oldest_pending_seconds", "Age of the oldest job not yet uploaded.", func(s Snapshot) float64 { return s.OldestPending.Seconds() }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nixspool_queue_commits_total",
			Help: "Queue transactions committed, each with its fsyncs; concurrent enqueues share one (compare with nixspool_enqueue_duration_seconds_count)."},
			func() float64 {
				s, err := snapshot()
				if err != nil {
					return 0
				}
				return float64(s.Commits)
			}),
	)
	return m
}

// Serve serves /metrics on addr until the listener fails.
func (m *Metrics) Serve(addr string, log *slog.Logger) (net.Addr, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil {
			log.Error("metrics server", "err", err)
		}
	}()
	return l.Addr(), nil
}

// Enqueued records one durable enqueue.
func (m *Metrics) Enqueued(d time.Duration) {
	if m != nil {
		m.enqueueDur.Observe(d.Seconds())
	}
}

// Queued records n paths handed to the queue from source.
func (m *Metrics) Queued(source string, n int) {
	if m != nil && n > 0 {
		m.queued.WithLabelValues(source).Add(float64(n))
	}
}

// Uploaded records a finished job.
func (m *Metrics) Uploaded(d time.Duration, narBytes, fileBytes, skipped uint64) {
	if m == nil {
		return
	}
	m.uploads.WithLabelValues("uploaded").Inc()
	m.uploadDur.WithLabelValues("uploaded").Observe(d.Seconds())
	m.bytes.WithLabelValues("nar").Add(float64(narBytes))
	m.bytes.WithLabelValues("file").Add(float64(fileBytes))
	m.skipped.Add(float64(skipped))
}

// TimeToCache records how long a path took from its acknowledgement to
// its narinfo being in the cache.
func (m *Metrics) TimeToCache(d time.Duration) {
	if m != nil {
		m.ttc.Observe(d.Seconds())
	}
}

// Realisations records realisation objects written.
func (m *Metrics) Realisations(n int) {
	if m != nil && n > 0 {
		m.reals.Add(float64(n))
	}
}

// Failed records a failed attempt: result is "retry" or "failed", class
// the error class.
func (m *Metrics) Failed(d time.Duration, result, class string) {
	if m == nil {
		return
	}
	m.uploads.WithLabelValues(result).Inc()
	m.uploadDur.WithLabelValues(result).Observe(d.Seconds())
	m.errors.WithLabelValues(class).Inc()
}

// GCRun records a garbage collection cycle: its result, what it deleted
// (by kind) and its requests (by kind).
func (m *Metrics) GCRun(result string, end time.Time, d time.Duration, deleted map[string]int, bytes int64, requests map[string]int64) {
	if m == nil {
		return
	}
	m.gcRuns.WithLabelValues(result).Inc()
	for k, n := range deleted {
		m.gcDeleted.WithLabelValues(k).Add(float64(n))
	}
	m.gcBytes.Add(float64(bytes))
	for k, n := range requests {
		m.gcRequests.WithLabelValues(k).Add(float64(n))
	}
	m.gcLastRun.Set(float64(end.Unix()))
	m.gcLastDur.Set(d.Seconds())
}

// GCLeaseConflict records a cycle refused because of another collector.
func (m *Metrics) GCLeaseConflict() {
	if m != nil {
		m.gcConflicts.Inc()
	}
}

// GCRefusal records a narinfo write held back by garbage collection.
func (m *Metrics) GCRefusal() {
	if m != nil {
		m.gcRefusals.Inc()
	}
}

// OperatorAction records an operator's request: its operation and its
// outcome ("ok", "failed", or "refused" when the caller may not make it).
func (m *Metrics) OperatorAction(op, outcome string) {
	if m != nil {
		m.operator.WithLabelValues(op, outcome).Inc()
	}
}
