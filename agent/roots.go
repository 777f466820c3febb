package agent

import "fmt"

// unroot removes the GC root of path, whose job was just acknowledged or
// dropped, unless the path is queued again. An enqueue roots its paths
// before its jobs commit and finds the root of a job that is going away
// already there; removing that root afterwards would leave the new job
// unrooted. Enqueues therefore hold rootsMu shared from rooting to commit,
// and unroot checks the queue under rootsMu held exclusively.
func (a *Agent) unroot(path string) error {
	a.rootsMu.Lock()
	defer a.rootsMu.Unlock()
	queued, err := a.queue.Queued(path)
	if err != nil {
		return fmt.Errorf("remove gc root for %s: check the queue: %w", path, err)
	}
	if queued {
		return nil
	}
	return a.roots.Remove(path)
}
