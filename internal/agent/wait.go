package agent

import (
	"context"
	"time"

	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/protocol"
)

// wantFor is how long one wait request keeps its paths' jobs first in
// line: agentctl asks again well within it, and a waiter that went away
// stops hurrying them soon after.
const wantFor = 10 * time.Second

// presenceTimeout bounds the cache questions of one wait request.
const presenceTimeout = 15 * time.Second

// pathWaits tells where each of paths stands for `agentctl wait PATH`, and
// has the queue hand out the jobs of those still queued before any other.
// A path that has no job and is in no spooled request is looked up in the
// cache (free for a path agentd knows is there, once the cache's
// generation is confirmed by a question sent after the request arrived):
// its narinfo there means its closure is there too.
func (a *Agent) pathWaits(ctx context.Context, paths storePaths) ([]protocol.PathWait, error) {
	arrived := time.Now()
	// The spool before the queue: an import commits its jobs before it
	// removes the file, so a spooled path is seen in one of them.
	_, spooledPaths := a.spool.list()
	spooled := make(map[string]bool, len(spooledPaths))
	for _, p := range spooledPaths {
		spooled[p] = true
	}
	jobs, err := a.queue.Lookup(paths)
	if err != nil {
		return nil, err
	}
	out := make([]protocol.PathWait, len(paths))
	var want []uint64
	var ask []int // indexes into out
	for i, p := range paths {
		w := protocol.PathWait{Path: p}
		j, queued := jobs[p]
		switch {
		case !queued && spooled[p]:
			w.State = protocol.WaitSpooled
		case !queued:
			ask = append(ask, i)
		case j.State == queue.StateFailed:
			w.State, w.Job, w.Error = protocol.WaitFailed, j.ID, j.LastError
		default:
			w.Job = j.ID
			want = append(want, j.ID)
			switch {
			case j.State == queue.StateLeased:
				w.State = protocol.WaitUploading
			case j.Attempts > 0:
				w.State, w.Error = protocol.WaitRetrying, j.LastError
			default:
				w.State = protocol.WaitReady
			}
		}
		out[i] = w
	}
	if len(want) > 0 {
		a.queue.Want(want, a.now().Add(wantFor))
	}
	if len(ask) == 0 {
		return out, nil
	}
	var askPaths []string
	for _, i := range ask {
		askPaths = append(askPaths, paths[i])
	}
	ctx, cancel := context.WithTimeout(ctx, presenceTimeout)
	defer cancel()
	// "Cached" ends agentctl wait with success: it must hold for the cache
	// as it is now, not as it was when the paths were last seen there. One
	// generation question sent after this request arrived (shared with
	// concurrent ones) catches a bucket emptied since.
	var missing []string
	err = a.uploader.ConfirmGeneration(ctx, arrived)
	if err == nil {
		missing, err = a.uploader.CheckPresence(ctx, askPaths)
	}
	absent := make(map[string]bool, len(missing))
	for _, p := range missing {
		absent[p] = true
	}
	for _, i := range ask {
		switch {
		case err != nil:
			out[i].State, out[i].Error = protocol.WaitChecking, err.Error()
		case absent[paths[i]]:
			out[i].State = protocol.WaitUnknown
		default:
			out[i].State = protocol.WaitCached
		}
	}
	return out, nil
}
