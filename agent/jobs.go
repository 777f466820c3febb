package agent

import (
	"context"
	"sync"

	"github.com/nixspool/nixspool/queue"
)

// runningJobs are the jobs workers are uploading now, so that dropping one
// stops its upload.
type runningJobs struct {
	mu   sync.Mutex
	jobs map[uint64]*runningJob
}

type runningJob struct {
	cancel  context.CancelFunc
	dropped bool
}

// startJob returns the context a worker uploads job under (a drop of the job
// cancels it) and the function the worker calls when the upload returns.
// That function reports whether the job was dropped meanwhile: then the
// worker records no outcome, and the function has already ended the lease
// and discarded the path's resumable upload state (the kept compressed NAR
// and the multipart upload), which only now nothing reads any more.
func (a *Agent) startJob(job *queue.Job) (context.Context, func() bool) {
	ctx, cancel := context.WithCancel(a.uploadCtx)
	rj := &runningJob{cancel: cancel}
	a.running.mu.Lock()
	if a.running.jobs == nil {
		a.running.jobs = map[uint64]*runningJob{}
	}
	if a.queue.IsLeased(job.ID) {
		a.running.jobs[job.ID] = rj
	} else {
		// Dropped between its lease and now.
		rj.dropped = true
		cancel()
	}
	a.running.mu.Unlock()
	return ctx, func() bool {
		a.running.mu.Lock()
		if a.running.jobs[job.ID] == rj {
			delete(a.running.jobs, job.ID)
		}
		dropped := rj.dropped
		a.running.mu.Unlock()
		cancel()
		if !dropped {
			return false
		}
		a.queue.Release(job.ID) // ends the dropped lease; nothing to commit
		a.uploader.Discard(context.WithoutCancel(a.uploadCtx), job.Path)
		a.log.Info("upload of a dropped job stopped", "job", job.ID, "path", job.Path)
		return true
	}
}

// stopDropped stops the upload of job id, which was just dropped from the
// queue, if a worker is running it; it reports whether one is (then the
// worker discards the job's resumable upload state once it has stopped).
func (a *Agent) stopDropped(id uint64) bool {
	a.running.mu.Lock()
	defer a.running.mu.Unlock()
	rj := a.running.jobs[id]
	if rj == nil {
		return false
	}
	rj.dropped = true
	rj.cancel()
	return true
}
