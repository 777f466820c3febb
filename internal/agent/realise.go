package agent

import (
	"context"
	"fmt"
	"slices"

	"github.com/nixspool/nixspool/internal/queue"
)

// realise publishes the realisations of a job's path once the path is in
// the cache, for the derivations noted for it: the job's own (which
// produced it) and those whose hook requests were folded into this job
// (a resolved content-addressed build fires the hook for the resolved
// derivation and then for the one clients know, with the same output).
// The uploader already wrote the ones it knew of with the narinfo; this
// covers a path that was in the cache before (an early cut-off rebuild,
// a second derivation with the same output) and notes that arrived while
// it was being uploaded. It returns the notes it covered.
func (a *Agent) realise(ctx context.Context, job *queue.Job) (noted []string, n int, err error) {
	for _, drv := range job.Derivations() {
		a.realiser.Note(drv, job.Path)
	}
	noted = a.realiser.Noted(job.Path)
	if !a.realiser.Wants(job.Path) {
		return noted, 0, nil
	}
	info, err := a.store.QueryPathInfo(ctx, job.Path)
	if err != nil || info == nil {
		return noted, 0, err
	}
	n, err = a.uploader.PutRealisations(ctx, info)
	return noted, n, err
}

// realiseLate runs once a job's acknowledgement is durable: derivations
// noted for its path after realise ran were folded into the finished job
// by deduplication; each that may still have a realisation to write gets a
// job of its own, so its realisation is published too. (Those recorded
// with the job during its upload keep it queued at the ack already; this
// finds it there.) A derivation the
// job itself was for is never queued again: the job wrote what it could for
// it, and queueing it again would only repeat the job (forever, for a path
// a filter leaves out). So a path is queued again once per late derivation.
func (a *Agent) realiseLate(job *queue.Job, covered []string) {
	own := job.Derivations()
	for _, drv := range a.realiser.Forget(job.Path, covered) {
		if slices.Contains(own, drv) || !a.realiser.Floating(drv) {
			continue
		}
		// Both came from the queue, checked when they were queued.
		in := intake{paths: storePaths{job.Path}, drv: drvPath(drv), source: job.Source}
		if _, err := a.intake.request(a.uploadCtx, in); err != nil {
			a.log.Warn("queue path again for a late derivation", "path", job.Path, "drv", drv, "err", err)
			continue
		}
		a.log.Info("path queued again for the realisation of a derivation noted during its upload", "path", job.Path, "drv", drv)
	}
}

// noteQueued gives the realiser the derivations every queued job was
// requested for: its notes live in memory, the jobs survive a restart.
func (a *Agent) noteQueued() error {
	jobs, err := a.queue.List("", 1<<31)
	if err != nil {
		return fmt.Errorf("note the derivations of queued jobs: %w", err)
	}
	for _, j := range jobs {
		for _, drv := range j.Derivations() {
			a.realiser.Note(drv, j.Path)
		}
	}
	return nil
}
