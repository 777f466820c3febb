package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/limit"
	"github.com/nixspool/nixspool/internal/metrics"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/systemd"
	"github.com/nixspool/nixspool/internal/uploader"
)

// Agent is a running agentd.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	cache  *cacheurl.Cache
	bucket bucket.Bucket
	queue  *queue.Queue
	store  *nixstore.Store
	// intake admits paths to the queue, whichever way they come.
	intake   *admit
	uploader *uploader.Uploader
	realiser *realisation.Realiser
	roots    *rootKeeper
	listener net.Listener
	conns    *connLimits // set by serve unless a test set it
	access   access      // who may make which request
	// groupsWarned: the kernel's lack of SO_PEERGROUPS was logged.
	groupsWarned atomic.Bool
	started      time.Time
	now          func() time.Time

	breaker     *breaker
	window      *limit.Limiter
	limited     bucket.Bucket // bucket through the window
	filter      *filter
	metrics     *metrics.Metrics // nil when off
	gc          *gcAgent
	rate        rateWindow
	timeToCache timeToCache
	reachable   atomic.Int32 // 0 unknown, 1 yes, 2 no
	stateErr    *stateError
	uploadCtx   context.Context
	stopUploads context.CancelFunc
	spoolImport *spoolImporter
	jobs        *jobRunner // jobs being uploaded (a drop stops them); set by Run
	spool       *spoolView
	capture     *capturer // nil unless --capture local|all
	// buildClosures queues hooks' build closures (--build-closures).
	buildClosures *closureQueuer
	captureErr    error // why the watcher could not start
}

// Run serves requests and uploads until ctx is cancelled (first signal),
// then stops accepting, gives in-flight uploads ShutdownGrace to finish
// (abort cancels that wait: second signal), and closes everything.
func (a *Agent) Run(ctx context.Context, abort <-chan struct{}) error {
	defer a.store.Close()
	defer a.intake.store.Close()
	a.uploadCtx, a.stopUploads = context.WithCancel(context.WithoutCancel(ctx))
	defer a.stopUploads()
	a.jobs = newJobRunner(a.uploadCtx, a.queue, a.roots, a.uploader, a.log)
	up, uploadCtx := a.uploader, a.uploadCtx
	a.intake.prefetch = func(paths []string) { up.Prefetch(uploadCtx, paths) }

	// The derivations acknowledged before a restart, for the realisations.
	if err := a.noteQueued(); err != nil {
		a.log.Error("start-up recovery", "err", err)
	}
	// The spool is imported by the main loop, after READY=1: a large
	// spool or a Nix daemon that does not answer must not hold the start
	// past systemd's start timeout. Until then recover keeps its roots.
	if err := a.roots.reconcile(); err != nil {
		a.log.Error("start-up recovery", "err", err)
	}
	if err := a.uploader.RecoverUploads(ctx); err != nil {
		a.log.Error("recover resumable uploads", "err", err)
	}
	go func() {
		// Multipart uploads nobody will complete cost storage; ones
		// younger than a day may be another machine's, still running.
		n, err := a.uploader.AbortStaleUploads(ctx, 24*time.Hour)
		if err != nil {
			a.log.Warn("clean up stale multipart uploads", "err", err)
		} else if n > 0 {
			a.log.Info("aborted stale multipart uploads", "count", n)
		}
	}()
	if err := a.uploader.EnsureCacheInfo(ctx); err != nil {
		a.setReachable(false)
		if errors.Is(err, bucket.ErrUnavailable) {
			ra, _ := bucket.RetryAfter(err)
			a.breaker.trip(a.now(), ra)
		}
		a.log.Warn("cache not reachable at start; uploads wait for it", "err", err)
	} else {
		a.setReachable(true)
	}

	a.gc.start(ctx)

	var wg sync.WaitGroup
	wg.Add(2)
	if a.capture != nil {
		wg.Add(1)
		go func() { defer wg.Done(); a.capture.run(ctx) }()
	}
	go func() { defer wg.Done(); a.serve(ctx) }()
	go func() { defer wg.Done(); a.chores(ctx) }()
	if a.cfg.BuildClosures {
		wg.Add(1)
		go func() { defer wg.Done(); a.buildClosures.run(ctx) }()
	}
	var workers sync.WaitGroup
	for i := 0; i < a.cfg.Jobs; i++ {
		workers.Add(1)
		go func() { defer workers.Done(); a.worker(ctx) }()
	}
	systemd.Ready()
	a.mainLoop(ctx)

	systemd.Stopping()
	a.log.Info("shutting down", "grace", a.cfg.ShutdownGrace)
	a.listener.Close()
	done := make(chan struct{})
	go func() { workers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(a.cfg.ShutdownGrace):
		a.log.Warn("shutdown grace over; interrupting uploads (they resume at next start)")
		a.stopUploads()
		<-done
	case <-abort:
		a.log.Warn("second signal; interrupting uploads (they resume at next start)")
		a.stopUploads()
		<-done
	}
	wg.Wait()
	a.gc.wait(10 * time.Second)
	a.uploader.Close()
	err := a.queue.Close()
	a.log.Info("agentd stopped")
	return err
}

// snapshot feeds the metrics gauges.
func (a *Agent) snapshot() (metrics.Snapshot, error) {
	st, err := a.queue.Stats()
	if err != nil {
		return metrics.Snapshot{}, err
	}
	snap := metrics.Snapshot{Pending: st.Pending, Uploading: st.Leased, Retrying: st.Retrying, Failed: st.Failed,
		BySource: map[string]int{}, Commits: a.queue.Commits()}
	for src, n := range st.BySource {
		snap.BySource[src.String()] = n
	}
	if !st.OldestActive.IsZero() {
		snap.OldestPending = a.now().Sub(st.OldestActive)
	}
	return snap, nil
}

func (a *Agent) setReachable(ok bool) {
	if ok {
		a.reachable.Store(1)
	} else {
		a.reachable.Store(2)
	}
}

// SocketPath is the path clients connect to.
func (a *Agent) SocketPath() string { return a.listener.Addr().String() }
