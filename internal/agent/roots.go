package agent

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/nixroots"
	"github.com/nixspool/nixspool/internal/queue"
)

// rootsLockWait bounds how long a removal of GC roots waits for hooks that
// are rooting and spooling (each holds the roots directory's lock for the
// few writes that takes).
const rootsLockWait = 10 * time.Second

// unrootRetryEvery is how often removals of GC roots that could not be
// done (the roots directory's lock was held too long) are tried again.
const unrootRetryEvery = 30 * time.Second

// unrootBacklog holds the removals of GC roots to try again: by path, the
// derivations whose roots go with it.
type unrootBacklog struct {
	mu      sync.Mutex
	pending map[string][]string
}

// add records a removal to try again.
func (b *unrootBacklog) add(path string, drvs []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pending == nil {
		b.pending = map[string][]string{}
	}
	for _, d := range drvs {
		if !slices.Contains(b.pending[path], d) {
			b.pending[path] = append(b.pending[path], d)
		}
	}
	if _, ok := b.pending[path]; !ok {
		b.pending[path] = nil
	}
}

// take returns the removals recorded and forgets them.
func (b *unrootBacklog) take() map[string][]string {
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.pending
	b.pending = nil
	return p
}

// len returns how many paths have a removal to try again.
func (b *unrootBacklog) len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.pending)
}

// rootKeeper owns the GC roots of queued and spooled paths: their making
// (whileRooted), their removal once a job is done or dropped, removals to
// try again, and the reconciliation at start.
type rootKeeper struct {
	dir *nixroots.Roots
	// mu: enqueues hold it shared from rooting to commit; removals and
	// the reconciliation exclusively (see unroot).
	mu sync.RWMutex
	// wait bounds the wait for the roots directory's lock in a removal
	// (rootsLockWait unless a test sets it).
	wait  time.Duration
	later unrootBacklog // removals to try again
	queue *queue.Queue
	// spoolHeld returns the paths the spool needs roots for.
	spoolHeld func() []string
	log       *slog.Logger
}

// whileRooted roots paths (and their derivation drv) while commit runs,
// under the lock that keeps a removal from taking a root from under the
// commit, and returns the error of the rooting.
func (k *rootKeeper) whileRooted(paths []string, drv string, commit func() error) error {
	k.mu.RLock() // see unroot
	defer k.mu.RUnlock()
	rooted := make(chan error, 1)
	roots := map[string]string{}
	for _, p := range paths {
		jobRoots(roots, p, drv)
	}
	go func() { rooted <- k.dir.AddNamed(roots) }()
	commit()
	return <-rooted
}

// retry tries again the removals of GC roots that failed: each that
// fails again stays in the backlog.
func (k *rootKeeper) retry() {
	for path, drvs := range k.later.take() {
		if err := k.remove(path, drvs); err != nil {
			k.log.Warn("remove gc root (will try again)", "path", path, "err", err)
		}
	}
}

// unroot removes the GC roots of path, whose job (requested for the
// derivations drvs) was just acknowledged or dropped: the path's, unless
// the path is queued again or waits in the spool, and the job's roots of
// its derivations. An enqueue roots its paths before its jobs commit and
// finds the root of a job that is going away already there; removing that
// root afterwards would leave the new job unrooted. Enqueues (and spool
// imports) therefore hold mu shared from rooting to commit, and unroot
// checks the queue under mu held exclusively. A hook that spools the
// path finds the root in place the same way: it holds the roots directory's
// lock shared from rooting until its spool file is written, and unroot
// checks the spool under that lock held exclusively. The directory's lock
// is taken first, then mu: waiting for hooks never holds up enqueues.
// A removal that cannot take the lock in time is tried again later.
func (k *rootKeeper) unroot(path string, drvs []string) error {
	return k.remove(path, drvs)
}

// unrootSpooled removes the root the hook made for the derivation of a
// spool file just imported, unless another spool file needs it. The jobs
// the import queued keep the derivation with roots of their own.
func (k *rootKeeper) unrootSpooled(drv string) error {
	return k.remove(drv, nil)
}

// remove removes the roots of path (unless it is queued or spooled) and
// of its derivations drvs (unless the path's queued job has them).
func (k *rootKeeper) remove(path string, drvs []string) error {
	if !k.dir.Enabled() {
		return nil
	}
	err := k.removeLocked(path, drvs)
	if err != nil {
		k.later.add(path, drvs)
	}
	return err
}

// removeLocked is remove, without the retry.
func (k *rootKeeper) removeLocked(path string, drvs []string) error {
	wait := k.wait
	if wait == 0 {
		wait = rootsLockWait
	}
	// Lock order: the directory's lock, then mu (see reconcile).
	unlock, err := k.dir.Lock(true, wait)
	if err != nil {
		return fmt.Errorf("remove gc root for %s: %w", path, err)
	}
	defer unlock()
	k.mu.Lock()
	defer k.mu.Unlock()
	jobs, err := k.queue.Lookup([]string{path})
	if err != nil {
		return fmt.Errorf("remove gc root for %s: check the queue: %w", path, err)
	}
	// A job of path queued now (the one acknowledged, kept for derivations
	// requested during its upload, or a new one) keeps the path's root and
	// those of its own derivations, not those of the others.
	var keep []string
	j, queued := jobs[path]
	if queued {
		keep = j.Derivations()
	}
	for _, d := range drvs {
		if slices.Contains(keep, d) {
			continue
		}
		if err := k.dir.RemoveNamed(nixroots.DerivationRoot(d, path)); err != nil {
			return err
		}
	}
	if queued {
		return nil
	}
	if slices.Contains(k.spoolHeld(), path) {
		return nil
	}
	return k.dir.Remove(path)
}

// reconcile re-creates GC roots for every queued path and its derivations
// (a crash may have lost some) and removes roots of paths that are neither
// queued nor held by the spool (the hook roots what it spools; a spooled
// request whose import was postponed, or that was set aside, keeps its
// roots). The queue and the spool are read under the locks that enqueues,
// imports and spooling hooks hold from rooting to commit (see unroot), so
// a root one of them found in place is not removed under it. Roots younger
// than a minute are spared too, for a hook that does not take the lock.
func (k *rootKeeper) reconcile() error {
	if !k.dir.Enabled() {
		return nil
	}
	unlock, err := k.dir.Lock(true, rootsLockWait)
	if err != nil {
		return err
	}
	defer unlock()
	k.mu.Lock() // after the directory's lock, as in removeLocked
	defer k.mu.Unlock()
	jobs, err := k.queue.List("", 1<<31)
	if err != nil {
		return err
	}
	keep := nixroots.Named(k.spoolHeld())
	for _, j := range jobs {
		jobRoots(keep, j.Path, j.Derivations()...)
	}
	added, removed, err := k.dir.Reconcile(keep, time.Minute)
	if added+removed > 0 {
		k.log.Info("reconciled gc roots", "added", added, "removed", removed)
	}
	return err
}

// jobRoots are the roots a job needs: its path's, and one for each of its
// derivations (see nixroots.DerivationRoot), added to roots.
func jobRoots(roots map[string]string, path string, drvs ...string) map[string]string {
	roots[filepath.Base(path)] = path
	for _, d := range drvs {
		if d != "" {
			roots[nixroots.DerivationRoot(d, path)] = d
		}
	}
	return roots
}
