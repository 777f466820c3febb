package agent

import (
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nixspool/nixspool/gcroots"
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

// retryUnroots tries again the removals of GC roots that failed: each that
// fails again stays in the backlog.
func (a *Agent) retryUnroots() {
	for path, drvs := range a.unrootLater.take() {
		if err := a.removeRoots(path, drvs); err != nil {
			a.log.Warn("remove gc root (will try again)", "path", path, "err", err)
		}
	}
}

// unroot removes the GC roots of path, whose job (requested for the
// derivations drvs) was just acknowledged or dropped: the path's, unless
// the path is queued again or waits in the spool, and the job's roots of
// its derivations. An enqueue roots its paths before its jobs commit and
// finds the root of a job that is going away already there; removing that
// root afterwards would leave the new job unrooted. Enqueues (and spool
// imports) therefore hold rootsMu shared from rooting to commit, and unroot
// checks the queue under rootsMu held exclusively. A hook that spools the
// path finds the root in place the same way: it holds the roots directory's
// lock shared from rooting until its spool file is written, and unroot
// checks the spool under that lock held exclusively. The directory's lock
// is taken first, then rootsMu: waiting for hooks never holds up enqueues.
// A removal that cannot take the lock in time is tried again later.
func (a *Agent) unroot(path string, drvs []string) error {
	return a.removeRoots(path, drvs)
}

// unrootSpooled removes the root the hook made for the derivation of a
// spool file just imported, unless another spool file needs it. The jobs
// the import queued keep the derivation with roots of their own.
func (a *Agent) unrootSpooled(drv string) error {
	return a.removeRoots(drv, nil)
}

// removeRoots removes the roots of path (unless it is queued or spooled) and
// of its derivations drvs (unless the path's queued job has them).
func (a *Agent) removeRoots(path string, drvs []string) error {
	if !a.roots.Enabled() {
		return nil
	}
	err := a.removeRootsLocked(path, drvs)
	if err != nil {
		a.unrootLater.add(path, drvs)
	}
	return err
}

// removeRootsLocked is removeRoots, without the retry.
func (a *Agent) removeRootsLocked(path string, drvs []string) error {
	wait := a.rootsWait
	if wait == 0 {
		wait = rootsLockWait
	}
	// Lock order: the directory's lock, then rootsMu (see recover).
	unlock, err := a.roots.Lock(true, wait)
	if err != nil {
		return fmt.Errorf("remove gc root for %s: %w", path, err)
	}
	defer unlock()
	a.rootsMu.Lock()
	defer a.rootsMu.Unlock()
	jobs, err := a.queue.Lookup([]string{path})
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
		if err := a.roots.RemoveNamed(gcroots.DerivationRoot(d, path)); err != nil {
			return err
		}
	}
	if queued {
		return nil
	}
	if _, held := a.spooled(); slices.Contains(held, path) {
		return nil
	}
	return a.roots.Remove(path)
}

// jobRoots are the roots a job needs: its path's, and one for each of its
// derivations (see gcroots.DerivationRoot), added to roots.
func jobRoots(roots map[string]string, path string, drvs ...string) map[string]string {
	roots[filepath.Base(path)] = path
	for _, d := range drvs {
		if d != "" {
			roots[gcroots.DerivationRoot(d, path)] = d
		}
	}
	return roots
}
