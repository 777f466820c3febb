package robustness

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/statedir"
	"github.com/nixspool/nixspool/internal/uploader"
)

// agent is one agentd as far as the cache is concerned: an uploader with
// its state directory (the queue database keeps presence records and
// resume records across a crash), a gc watcher as its guard, and workers
// that upload the paths handed to it, retrying as agentd does.
type agent struct {
	name   string
	dir    string
	client *Client
	store  *nixStore
	key    signature.SecretKey
	log    *slog.Logger
	onAck  func(a *agent, path string, started time.Time)
	onFail func(a *agent, path string, err error)

	mu       sync.Mutex
	running  bool
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	up       *uploader.Uploader
	q        *queue.Queue
	jobs     chan string
	pending  map[string]bool               // handed over and not acknowledged (survives a crash: the durable queue)
	running_ map[string]context.CancelFunc // job path → cancels its upload (a drop)
	ctx      context.Context
}

const agentWorkers = 4

// start brings the agent up with its state directory as it was.
func (a *agent) start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.running {
		return nil
	}
	q, err := queue.Open(statedir.Dir(a.dir).Queue())
	if err != nil {
		return fmt.Errorf("agent %s: %w", a.name, err)
	}
	cache, err := cacheurl.Parse("file:///robustness")
	if err != nil {
		q.Close()
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	var up *uploader.Uploader
	w := cachegc.NewWatcher(cachegc.WatcherOptions{
		Bucket: a.client, Poll: 200 * time.Millisecond, ID: a.name, Host: "robustness", Version: "test",
		Logger: a.log.With("part", "watcher"),
		Forget: func(paths []string) { up.ForgetPaths(paths) },
	})
	up, err = uploader.New(uploader.Options{
		Bucket: a.client, Cache: cache, Store: a.store, Keys: []signature.SecretKey{a.key},
		TempDir: statedir.Dir(a.dir).Temp(), Workers: 16, Streams: 1, SmallBudget: 8 << 20,
		Logger: a.log, Presence: q, Resume: q, Guard: w, ResumeAbove: 1 << 20,
		GenerationCheck: 2 * time.Second,
	})
	if err != nil {
		cancel()
		q.Close()
		return fmt.Errorf("agent %s: %w", a.name, err)
	}
	if err := up.RecoverUploads(ctx); err != nil {
		a.log.Warn("recover uploads", "err", err)
	}
	a.up, a.q, a.cancel, a.running, a.ctx = up, q, cancel, true, ctx
	a.running_ = map[string]context.CancelFunc{}
	a.jobs = make(chan string, 4096)
	if a.pending == nil {
		a.pending = map[string]bool{}
	}
	for p := range a.pending {
		a.jobs <- p
	}
	a.wg.Add(1)
	go func() { defer a.wg.Done(); w.Run(ctx) }()
	for i := 0; i < agentWorkers; i++ {
		a.wg.Add(1)
		go func() { defer a.wg.Done(); a.work(ctx, up, a.jobs) }()
	}
	return nil
}

// crash stops the agent the way kill -9 does as far as the cache can
// tell: requests in flight are cut (a write the store already took still
// lands), nothing is acknowledged any more, and memory is lost. The state
// directory stays.
func (a *agent) crash() {
	a.mu.Lock()
	if !a.running {
		a.mu.Unlock()
		return
	}
	a.running = false
	a.cancel()
	up, q := a.up, a.q
	a.mu.Unlock()
	a.wg.Wait()
	up.Close()
	q.Close()
}

// submit hands a path over, as the hook does.
func (a *agent) submit(p string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pending[p] = true
	if a.running {
		select {
		case a.jobs <- p:
		default: // full: picked up at the next start
		}
	}
}

func (a *agent) pendingCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.pending)
}

func (a *agent) work(ctx context.Context, up *uploader.Uploader, jobs <-chan string) {
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-jobs:
			a.upload(ctx, up, p)
		}
	}
}

// drop drops the job for p, as `agentctl drop` does: its upload is
// cancelled, and its resumable upload state is released.
func (a *agent) drop(p string) bool {
	a.mu.Lock()
	if !a.running || !a.pending[p] {
		a.mu.Unlock()
		return false
	}
	delete(a.pending, p)
	if cancel := a.running_[p]; cancel != nil {
		cancel()
	}
	up, ctx := a.up, a.ctx
	a.wg.Add(1)
	a.mu.Unlock()
	go func() {
		defer a.wg.Done()
		up.Discard(ctx, p)
	}()
	return true
}

// pushClosure pushes p's closure, as `agentctl push --closure` does: the
// presence of all of it is asked in bulk first (a listing where that is
// cheaper).
func (a *agent) pushClosure(paths []string) {
	a.mu.Lock()
	up, ctx, running := a.up, a.ctx, a.running
	a.mu.Unlock()
	if running {
		up.Prefetch(ctx, paths)
	}
	for _, p := range paths {
		a.submit(p)
	}
}

func (a *agent) upload(ctx context.Context, up *uploader.Uploader, p string) {
	a.mu.Lock()
	if !a.pending[p] || a.running_[p] != nil {
		a.mu.Unlock()
		return // dropped, or already being uploaded by another worker
	}
	ctx, cancel := context.WithCancel(ctx)
	a.running_[p] = cancel
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.running_, p)
		a.mu.Unlock()
		cancel()
	}()
	backoff := 20 * time.Millisecond
	for ctx.Err() == nil {
		started := time.Now()
		_, err := up.Upload(ctx, p)
		if ctx.Err() != nil {
			return // crashed: no acknowledgement
		}
		if err == nil {
			a.mu.Lock()
			if a.running {
				delete(a.pending, p)
			}
			a.mu.Unlock()
			a.onAck(a, p, started)
			return
		}
		if uploader.IsPermanent(err) {
			a.mu.Lock()
			delete(a.pending, p)
			a.mu.Unlock()
			a.onFail(a, p, err)
			return
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
		backoff = min(backoff*2, 500*time.Millisecond)
	}
}
