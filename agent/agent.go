package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nixspool/nixspool/atomicfile"
	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/bucket/limit"
	"github.com/nixspool/nixspool/bucket/open"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/gcroots"
	"github.com/nixspool/nixspool/hook"
	"github.com/nixspool/nixspool/metrics"
	"github.com/nixspool/nixspool/nixstore"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/queue"
	"github.com/nixspool/nixspool/realisation"
	"github.com/nixspool/nixspool/systemd"
	"github.com/nixspool/nixspool/uploader"
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
	spoolBusy   atomic.Bool   // a spool import is running
	spoolBeat   atomic.Int64  // unix ns of its last progress
	spoolTries  spoolAttempts // failed imports of spool files
	jobs        *jobRunner    // jobs being uploaded (a drop stops them); set by Run
	spool       *spoolView
	capture     *capturer // nil unless --capture local|all
	// buildClosures queues hooks' build closures (--build-closures).
	buildClosures *closureQueuer
	captureErr    error // why the watcher could not start
	// spoolFileBound bounds the import of one spool file (0: the default).
	spoolFileBound time.Duration
}

// assemble makes the parts that share the queue, the roots directory dir
// and the store connections for requests' checks, checkStore.
func (a *Agent) assemble(dir *gcroots.Roots, checkStore requestStore) {
	a.stateErr = &stateError{}
	a.spool = &spoolView{dir: a.spoolDir(), log: a.log}
	a.roots = &rootKeeper{dir: dir, queue: a.queue, spoolHeld: a.spool.held, log: a.log}
	a.intake = &admit{storeDir: a.cfg.StoreDir, store: checkStore, realiser: a.realiser, roots: a.roots,
		queue: a.queue, stateErr: a.stateErr, now: a.now, log: a.log}
}

// requestStore is what the checks of requests ask the Nix daemon
// (nixstore.Store implements it).
type requestStore interface {
	QueryValidPaths(ctx context.Context, paths []string) ([]string, error)
	QueryDerivationOutputMap(ctx context.Context, drv string) (map[string]string, error)
	Close() error
}

// New opens everything agentd needs: the queue (returning interrupted jobs
// to ready), the bucket, the Nix store connection, the signing keys and the
// listening socket. It does not start serving.
func New(c Config) (*Agent, error) {
	cfg, err := c.parse()
	if err != nil {
		return nil, err
	}
	a, err := newAgent(cfg)
	if err != nil {
		return nil, err
	}
	keys, err := a.openCache(cfg)
	if err != nil {
		return nil, err
	}
	dir, err := a.openStateDir(cfg)
	if err != nil {
		return nil, err
	}
	if err := a.openQueue(cfg, keys, dir); err != nil {
		return nil, err
	}
	if err := a.start(cfg, keys); err != nil {
		a.queue.Close()
		return nil, err
	}
	a.logStart(len(keys))
	return a, nil
}

// newAgent makes the Agent of cfg with the parts that open nothing.
func newAgent(cfg parsedConfig) (*Agent, error) {
	a := &Agent{cfg: cfg.Config, log: cfg.Logger, started: time.Now(), now: time.Now,
		access: access{ownUID: os.Geteuid()}, cache: cfg.cache}
	if cfg.AdminGroup != "" {
		g, err := lookupGroup("--admin-group", cfg.AdminGroup)
		if err != nil {
			return nil, err
		}
		a.access.admin = g
	}
	a.breaker = newBreaker(a.backoff)
	a.filter = newFilter(cfg)
	return a, nil
}

// openCache loads the signing keys and opens the bucket, and the window
// every request of the uploads and of the collector goes through.
func (a *Agent) openCache(cfg parsedConfig) ([]signature.SecretKey, error) {
	// Signing keys from the cache URL (secret-key=, secret-keys=) join
	// --secret-key-file's; doctor checks the same list.
	a.cfg.SecretKeyFiles = uploader.KeyFiles(cfg.SecretKeyFiles, a.cache.SecretKeyFiles)
	keys, err := uploader.LoadSecretKeys(a.cfg.SecretKeyFiles, cfg.AllowInsecureKeyPerms)
	if err != nil {
		return nil, err
	}
	a.cache.NetrcFile = cfg.NetrcFile
	if a.bucket, err = open.Cache(a.cache); err != nil {
		return nil, err
	}
	a.window = limit.New(limit.Options{Min: cfg.MinRequests, Max: cfg.MaxRequests})
	if t, ok := a.bucket.(interface{ OnThrottle(func()) }); ok {
		t.OnThrottle(a.window.Throttled) // every 429/503, also those the S3 client retries itself
	}
	a.limited = limit.Wrap(a.bucket, a.window)
	return keys, nil
}

// openStateDir creates the state directory, the collector's part (its
// identity lives there) and the GC roots directory, and records the
// latter for the hook.
func (a *Agent) openStateDir(cfg parsedConfig) (*gcroots.Roots, error) {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	var err error
	if a.gc, err = newGCAgent(a.gcDeps()); err != nil {
		return nil, err
	}
	dir, err := gcroots.New(cfg.GCRootsDir)
	if err != nil {
		return nil, err
	}
	// The hook roots what it spools where this agentd looks.
	recorded := cfg.GCRootsDir
	if recorded == "" {
		recorded = "off"
	}
	if err := atomicfile.Write(filepath.Join(cfg.StateDir, hook.RootsFile), strings.NewReader(recorded+"\n"), -1, 0o644); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	return dir, nil
}

// gcDeps is what the collector's part needs of the agent.
func (a *Agent) gcDeps() gcDeps {
	return gcDeps{bucket: a.limited, cacheID: a.cache.Identity(), stateDir: a.cfg.StateDir, log: a.log,
		settings: gcSettings{poll: a.cfg.GCPollInterval, interval: a.cfg.GCInterval, keepSince: a.cfg.GCKeepSince, grace: a.cfg.GCGrace}}
}

// openQueue opens the Nix store connections and the queue, and makes the
// parts that share them.
func (a *Agent) openQueue(cfg parsedConfig, keys []signature.SecretKey, dir *gcroots.Roots) error {
	a.store = nixstore.Open(nixstore.Options{Socket: cfg.NixDaemonSocket, MaxConns: min(cfg.Jobs, 8)})
	// Requests (the hook's) check their paths on connections of their own,
	// so that a hook never waits behind the uploads' metadata queries.
	checkStore := nixstore.Open(nixstore.Options{Socket: cfg.NixDaemonSocket, MaxConns: 2})
	var err error
	if a.queue, err = queue.Open(filepath.Join(cfg.StateDir, "queue.db")); err != nil {
		return err
	}
	a.realiser = realisation.New(realisation.Options{Store: a.store, Keys: keys, StoreDir: cfg.StoreDir, Logger: a.log})
	a.assemble(dir, checkStore)
	return nil
}

// start makes the uploader, serves the metrics, starts the store watcher
// and listens on the socket.
func (a *Agent) start(cfg parsedConfig, keys []signature.SecretKey) error {
	if err := a.newUploader(cfg, keys); err != nil {
		return err
	}
	if cfg.MetricsListen != "" {
		a.metrics = metrics.New(a.snapshot)
		addr, err := a.metrics.Serve(cfg.MetricsListen, a.log)
		if err != nil {
			return err
		}
		a.log.Info("serving metrics", "addr", addr.String())
	}
	a.gc.connect(a.uploader.ForgetPaths, a.metrics)
	a.startCapture()
	a.buildClosures = newClosureQueuer(maxPendingBuildClosures, a.queueBuildClosure)
	return a.listen()
}

func (a *Agent) newUploader(cfg parsedConfig, keys []signature.SecretKey) error {
	var err error
	a.uploader, err = uploader.New(uploader.Options{
		Bucket:   a.limited,
		Cache:    a.cache,
		Store:    a.store,
		Keys:     keys,
		TempDir:  filepath.Join(cfg.StateDir, "tmp"),
		Workers:  cfg.MaxRequests,
		Logger:   a.log,
		Resume:   a.queue,
		Presence: a.queue,
		Upstream: a.filter.upstream,
		Exclude:  a.filter.exclude,
		Realiser: a.realiser,
		Guard:    a.gc.watcher,

		GenerationCheck: cfg.GenerationInterval,

		UploadLogs: cfg.UploadBuildLogs,
	})
	return err
}

func (a *Agent) logStart(keys int) {
	if len(a.cache.NoEffect) > 0 {
		a.log.Warn("cache URL parameters with no effect here", "params", a.cache.NoEffect)
	}
	a.log.Info("agentd started", "version", Version, "cache", a.cache.String(), "socket", a.listener.Addr().String(),
		"nix_store", a.store.String(), "gc_roots", a.cfg.GCRootsDir, "jobs", a.cfg.Jobs, "max_requests", a.cfg.MaxRequests, "keys", keys)
}

// listen takes the socket-activated listener, or creates the socket: in a
// 0750 directory (created if missing), mode 0660, owned by the socket group.
// A stale socket file is replaced only if nothing answers on it.
func (a *Agent) listen() error {
	l, err := systemd.Listener()
	if err != nil {
		return err
	}
	if l != nil {
		a.listener = l
		a.access.socket = groupOfGID(socketGID(l.Addr().String()))
		a.log.Info("using socket-activated listener", "socket", l.Addr().String())
		return nil
	}
	path := a.cfg.Socket
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return fmt.Errorf("socket directory: %w", err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("socket %s: exists and is not a socket; refusing to replace it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return fmt.Errorf("socket %s: another agentd is listening on it", path)
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove stale socket: %w", err)
		}
	}
	var sockGroup group
	if a.cfg.SocketGroup != "" {
		if sockGroup, err = lookupGroup("--socket-group", a.cfg.SocketGroup); err != nil {
			return err
		}
	}
	gid := -1
	if sockGroup.set {
		gid = sockGroup.gid
	}
	// Create the socket with no access for others from the first instant.
	old := syscall.Umask(0o117)
	l, err = net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return fmt.Errorf("chown socket to group %s: %w", a.cfg.SocketGroup, err)
		}
		if err := os.Chown(dir, -1, gid); err != nil {
			a.log.Warn("cannot give the socket group access to the socket directory", "dir", dir, "err", err)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return err
	}
	a.listener = l
	a.access.socket = sockGroup
	return nil
}

func socketGID(path string) int {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return -1
	}
	return int(st.Gid)
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

// mainLoop runs periodic chores until ctx is done: spool imports (the
// first at once), the systemd status line and watchdog pings. The watchdog is pinged from here
// only while the loop and the spool import it started make progress, so that
// a wedged agentd gets the service restarted; a spool import that is merely
// long (a big spool) keeps the pings going file by file.
func (a *Agent) mainLoop(ctx context.Context) {
	spoolTick := time.NewTicker(a.cfg.SpoolInterval)
	defer spoolTick.Stop()
	statusTick := time.NewTicker(5 * time.Second)
	defer statusTick.Stop()
	var wdC <-chan time.Time
	iv := systemd.WatchdogInterval()
	if iv > 0 {
		t := time.NewTicker(iv)
		defer t.Stop()
		wdC = t.C
		systemd.Watchdog()
	}
	a.publishStatus()
	var importing sync.WaitGroup
	defer importing.Wait()
	startImport := func() {
		if !a.spoolBusy.CompareAndSwap(false, true) {
			return // the previous import is still running
		}
		a.spoolBeat.Store(time.Now().UnixNano())
		importing.Add(1)
		go func() {
			defer importing.Done()
			defer a.spoolBusy.Store(false)
			a.importSpool(ctx)
		}()
	}
	startImport() // what was spooled while agentd was away, right away
	for {
		select {
		case <-ctx.Done():
			return
		case <-spoolTick.C:
			startImport()
		case <-statusTick.C:
			a.publishStatus()
		case <-wdC:
			if stalled := a.spoolStalled(max(4*iv, 2*time.Minute)); stalled > 0 {
				a.log.Error("spool import made no progress; not pinging the watchdog", "stalled_for", stalled.Round(time.Second))
				continue
			}
			systemd.Watchdog()
		}
	}
}

// spoolStalled returns how long a running spool import has made no
// progress, if longer than limit; otherwise 0.
func (a *Agent) spoolStalled(limit time.Duration) time.Duration {
	if !a.spoolBusy.Load() {
		return 0
	}
	d := time.Since(time.Unix(0, a.spoolBeat.Load()))
	if d > limit {
		return d
	}
	return 0
}

// chores runs the periodic checks that must not wait on the main loop:
// whether the cache was reset (its generation), and pruning what grows
// with uptime.
func (a *Agent) chores(ctx context.Context) {
	gen := time.NewTicker(a.cfg.GenerationInterval)
	defer gen.Stop()
	prune := time.NewTicker(10 * time.Minute)
	defer prune.Stop()
	unroots := time.NewTicker(unrootRetryEvery)
	defer unroots.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gen.C:
			if a.breaker.isOpen() {
				continue // the probes check it
			}
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			if err := a.uploader.CheckGeneration(cctx); err != nil {
				a.log.Debug("check cache generation", "err", err)
			}
			cancel()
		case <-prune.C:
			a.uploader.Maintain()
		case <-unroots.C:
			a.roots.retry()
		}
	}
}

func (a *Agent) publishStatus() {
	if s, err := a.status(); err == nil {
		systemd.Status(protocol.Summary(s))
	}
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
