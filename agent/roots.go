package agent

import (
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/nixspool/nixspool/gcroots"
)

// rootsLockWait bounds how long a removal of GC roots waits for hooks that
// are rooting and spooling (each holds the roots directory's lock for the
// few writes that takes).
const rootsLockWait = 10 * time.Second

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
// checks the spool under that lock held exclusively.
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
	unlock, err := a.roots.Lock(true, rootsLockWait)
	if err != nil {
		return fmt.Errorf("remove gc root for %s: %w", path, err)
	}
	defer unlock()
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
