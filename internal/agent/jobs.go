package agent

import (
	"context"
	"log/slog"
	"sync"

	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/uploader"
)

// jobRunner keeps the jobs workers are uploading now, so that dropping one
// stops its upload, and settles the state of a dropped job: its lease, its
// GC roots and its resumable upload state.
type jobRunner struct {
	uploadCtx context.Context // uploads run under it (Run makes it)
	queue     *queue.Queue
	roots     *rootKeeper
	uploader  *uploader.Uploader
	log       *slog.Logger

	mu   sync.Mutex
	jobs map[uint64]*runningJob
}

type runningJob struct {
	cancel  context.CancelFunc
	dropped bool
}

func newJobRunner(uploadCtx context.Context, q *queue.Queue, roots *rootKeeper, up *uploader.Uploader, log *slog.Logger) *jobRunner {
	return &jobRunner{uploadCtx: uploadCtx, queue: q, roots: roots, uploader: up, log: log, jobs: map[uint64]*runningJob{}}
}

// start returns the context a worker uploads job under (a drop of the job
// cancels it) and the function the worker calls when the upload returns.
// That function reports whether the job was dropped meanwhile: then the
// worker records no outcome, and the function has already ended the lease
// and discarded the path's resumable upload state (the kept compressed NAR
// and the multipart upload), which only now nothing reads any more.
func (r *jobRunner) start(job *queue.Job) (context.Context, func() bool) {
	ctx, cancel := context.WithCancel(r.uploadCtx)
	rj := &runningJob{cancel: cancel}
	r.mu.Lock()
	if r.queue.IsLeased(job.ID) {
		r.jobs[job.ID] = rj
	} else {
		// Dropped between its lease and now.
		rj.dropped = true
		cancel()
	}
	r.mu.Unlock()
	return ctx, func() bool { return r.finish(job, rj) }
}

// finish ends the run rj of job; see start.
func (r *jobRunner) finish(job *queue.Job, rj *runningJob) bool {
	r.mu.Lock()
	if r.jobs[job.ID] == rj {
		delete(r.jobs, job.ID)
	}
	dropped := rj.dropped
	r.mu.Unlock()
	rj.cancel()
	if !dropped {
		return false
	}
	r.queue.Release(job.ID) // ends the dropped lease; nothing to commit
	r.uploader.Discard(context.WithoutCancel(r.uploadCtx), job.Path)
	r.log.Info("upload of a dropped job stopped", "job", job.ID, "path", job.Path)
	return true
}

// stopDropped stops the upload of job id, which was just dropped from the
// queue, if a worker is running it; it reports whether one is (then the
// worker discards the job's resumable upload state once it has stopped).
func (r *jobRunner) stopDropped(id uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	rj := r.jobs[id]
	if rj == nil {
		return false
	}
	rj.dropped = true
	rj.cancel()
	return true
}

// drop removes job id from the queue, with its GC roots; a job being
// uploaded is stopped, and its worker discards the resumable upload state
// once it no longer reads it. uid is the requester's, for the log.
func (r *jobRunner) drop(ctx context.Context, id uint64, uid int) (*queue.Job, error) {
	j, err := r.queue.Drop(id)
	if err != nil {
		return nil, err
	}
	if err := r.roots.unroot(j.Path, j.Derivations()); err != nil {
		r.log.Warn("remove gc root", "path", j.Path, "err", err)
	}
	uploading := r.stopDropped(j.ID)
	if !uploading {
		r.uploader.Discard(ctx, j.Path)
	}
	r.log.Info("job dropped", "job", j.ID, "path", j.Path, "was_uploading", uploading, "peer_uid", uid)
	return j, nil
}
