package agent

import (
	"fmt"
	"slices"
	"time"
)

// rootsLockWait bounds how long a removal of GC roots waits for hooks that
// are rooting and spooling (each holds the roots directory's lock for the
// few writes that takes).
const rootsLockWait = 10 * time.Second

// unroot removes the GC root of path, whose job was just acknowledged or
// dropped, unless the path is queued again or waits in the spool. An
// enqueue roots its paths before its jobs commit and finds the root of a
// job that is going away already there; removing that root afterwards
// would leave the new job unrooted. Enqueues (and spool imports) therefore
// hold rootsMu shared from rooting to commit, and unroot checks the queue
// under rootsMu held exclusively. A hook that spools the path finds the
// root in place the same way: it holds the roots directory's lock shared
// from rooting until its spool file is written, and unroot checks the
// spool under that lock held exclusively.
func (a *Agent) unroot(path string) error {
	if !a.roots.Enabled() {
		return nil
	}
	a.rootsMu.Lock()
	defer a.rootsMu.Unlock()
	queued, err := a.queue.Queued(path)
	if err != nil {
		return fmt.Errorf("remove gc root for %s: check the queue: %w", path, err)
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
