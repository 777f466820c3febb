package agent

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/atomicfile"
	"github.com/nixspool/nixspool/internal/bucket/limit"
	"github.com/nixspool/nixspool/internal/bucket/open"
	"github.com/nixspool/nixspool/internal/metrics"
	"github.com/nixspool/nixspool/internal/nixroots"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/statedir"
	"github.com/nixspool/nixspool/internal/uploader"
)

// assemble makes the parts that share the queue, the roots directory dir
// and the store connections for requests' checks, checkStore.
func (a *Agent) assemble(dir *nixroots.Roots, checkStore requestStore) {
	a.stateErr = &stateError{}
	a.spool = &spoolView{dir: a.spoolDir(), log: a.log}
	a.roots = &rootKeeper{dir: dir, queue: a.queue, spoolHeld: a.spool.held, log: a.log}
	a.intake = &admit{storeDir: a.cfg.StoreDir, store: checkStore, realiser: a.realiser, roots: a.roots,
		queue: a.queue, stateErr: a.stateErr, now: a.now, log: a.log}
	a.spoolImport = &spoolImporter{dir: a.spoolDir(), view: a.spool, intake: a.intake, roots: a.roots, log: a.log}
}

func (a *Agent) spoolDir() string { return statedir.Dir(a.cfg.StateDir).Spool() }

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
	wopt := limit.Options{Min: cfg.MinRequests, Max: cfg.MaxRequests}
	if cfg.PaceUploads && a.cache.Scheme != "file" {
		// A remote cache may sit behind a slow first-come uplink, where a
		// large upload would make every small path wait behind it.
		wopt.Pacer = limit.NewPacer(limit.PaceOptions{ProbeKey: cachefmt.CacheInfoKey})
	}
	a.window = limit.New(wopt)
	if t, ok := a.bucket.(interface{ OnThrottle(func()) }); ok {
		t.OnThrottle(a.window.Throttled) // every 429/503, also those the S3 client retries itself
	}
	a.limited = limit.Wrap(a.bucket, a.window)
	return keys, nil
}

// openStateDir creates the state directory, the collector's part (its
// identity lives there) and the GC roots directory, and records the
// latter for the hook.
func (a *Agent) openStateDir(cfg parsedConfig) (*nixroots.Roots, error) {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	var err error
	if a.gc, err = newGCAgent(a.gcDeps()); err != nil {
		return nil, err
	}
	dir, err := nixroots.New(cfg.GCRootsDir)
	if err != nil {
		return nil, err
	}
	// The hook roots what it spools where this agentd looks.
	recorded := cfg.GCRootsDir
	if recorded == "" {
		recorded = "off"
	}
	if err := atomicfile.Write(statedir.Dir(cfg.StateDir).Roots(), strings.NewReader(recorded+"\n"), -1, 0o644); err != nil {
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
func (a *Agent) openQueue(cfg parsedConfig, keys []signature.SecretKey, dir *nixroots.Roots) error {
	a.store = nixstore.Open(nixstore.Options{Socket: cfg.NixDaemonSocket, MaxConns: min(cfg.Jobs, 8)})
	// Requests (the hook's) check their paths on connections of their own,
	// so that a hook never waits behind the uploads' metadata queries.
	checkStore := nixstore.Open(nixstore.Options{Socket: cfg.NixDaemonSocket, MaxConns: 2})
	var err error
	if a.queue, err = queue.Open(statedir.Dir(cfg.StateDir).Queue()); err != nil {
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
		TempDir:  statedir.Dir(cfg.StateDir).Temp(),
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
