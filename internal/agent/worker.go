package agent

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/uploader"
)

// worker leases due jobs and uploads them until ctx is done. Uploads run
// under a.uploadCtx, which outlives ctx by the shutdown grace period.
func (a *Agent) worker(ctx context.Context) {
	for ctx.Err() == nil {
		if probe, wait, closed := a.breaker.gate(a.now()); probe {
			a.probe(ctx)
			continue
		} else if wait > 0 {
			a.pause(ctx, wait, closed)
			continue
		}
		job, err := a.queue.Lease(a.now())
		if err != nil {
			a.stateErr.set(err)
			a.log.Error("lease", "err", err)
			a.sleep(ctx, time.Second)
			continue
		}
		if job == nil {
			a.waitForWork(ctx)
			continue
		}
		// One commit wakes one idle worker; pass the wake-up on in case
		// more jobs are due.
		a.queue.Poke()
		a.process(job)
	}
}

// waitForWork blocks until a commit may have made a job due, the next
// retry is due, or ctx is done.
func (a *Agent) waitForWork(ctx context.Context) {
	wait := time.Minute
	if due, ok, err := a.queue.NextDue(); err == nil && ok {
		wait = max(due.Sub(a.now()), 10*time.Millisecond)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-a.queue.Wake():
	case <-t.C:
	}
}

// probe checks whether the bucket is back (nix-cache-info is read, and
// written if missing) while the breaker is open.
func (a *Agent) probe(ctx context.Context) {
	err := a.uploader.Probe(ctx)
	ra, _ := bucket.RetryAfter(err)
	// Any answer but "unavailable" means the bucket is back: if it now
	// refuses (e.g. access denied), the jobs fail with that reason, where
	// an operator sees it, instead of waiting forever.
	back := err == nil || !errors.Is(err, bucket.ErrUnavailable)
	a.breaker.probed(a.now(), back, ra)
	if back {
		a.setReachable(true)
		if err != nil {
			a.log.Warn("cache answers again but refuses; resuming uploads", "err", err)
		} else {
			a.log.Info("cache reachable again; resuming uploads")
		}
		a.queue.Poke()
		return
	}
	a.log.Warn("cache still unreachable", "err", err)
}

func (a *Agent) pause(ctx context.Context, d time.Duration, closed <-chan struct{}) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-closed:
	case <-t.C:
	}
}

func (a *Agent) sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// process uploads one leased job and records the outcome.
func (a *Agent) process(job *queue.Job) {
	log := a.log.With("job", job.ID, "path", job.Path, "attempt", job.Attempts+1)
	start := time.Now()
	ctx, finish := a.jobs.start(job) // dropping the job cancels ctx
	res, err := a.uploader.Upload(ctx, job.Path)
	visible := a.now() // the narinfo is in the cache, if err is nil
	var noted []string
	switch {
	case err == nil && res.SelfSkipped:
		// Nothing of a path a filter leaves out is written, realisations
		// included: every derivation noted for it is settled.
		noted = a.realiser.Noted(job.Path)
	case err == nil:
		var n int
		noted, n, err = a.realise(ctx, job)
		res.Realisations += n
	}
	if finish() {
		return // dropped meanwhile: there is no outcome to record
	}
	now := a.now()
	switch {
	case err == nil:
		a.setReachable(true)
		totals := queue.Totals{Paths: uint64(res.Paths), NARBytes: res.NARBytes, FileBytes: res.FileBytes, Skipped: uint64(res.Skipped), Realisations: uint64(res.Realisations)}
		// The acknowledgement rides with the next commit; the GC root goes
		// once it is durable.
		a.queue.AckAsync(job.ID, totals, func(err error) {
			if err != nil && !errors.Is(err, queue.ErrNotFound) {
				a.stateErr.set(err)
				log.Error("ack", "err", err)
				return
			}
			if err := a.roots.unroot(job.Path, job.Derivations()); err != nil {
				log.Warn("remove gc root", "err", err)
			}
			a.realiseLate(job, noted)
		})
		a.rate.add(now, res.Paths, res.NARBytes)
		if !res.SelfSkipped {
			ttc := visible.Sub(job.EnqueuedAt)
			a.timeToCache.add(visible, ttc)
			a.metrics.TimeToCache(ttc)
		}
		a.metrics.Uploaded(time.Since(start), res.NARBytes, res.FileBytes, uint64(res.Skipped))
		a.metrics.Realisations(res.Realisations)
		log.Info("job done", "uploaded_paths", res.Paths, "skipped_paths", res.Skipped, "realisations", res.Realisations, "nar_bytes", res.NARBytes, "file_bytes", res.FileBytes, "duration", time.Since(start))
	case a.uploadCtx.Err() != nil:
		if err := a.queue.Release(job.ID); err != nil {
			log.Error("release", "err", err)
		}
		log.Info("upload interrupted by shutdown; job is ready again")
	case uploader.IsPermanent(err):
		if ferr := a.queue.Fail(job.ID, err.Error(), now); errors.Is(ferr, queue.ErrRequeued) {
			a.metrics.Failed(time.Since(start), "retry", "permanent")
			log.Warn("upload failed, but the path was requested again meanwhile; queued again", "err", err)
			return
		} else if ferr != nil {
			log.Error("fail", "err", ferr)
		}
		a.uploader.Discard(a.uploadCtx, job.Path)
		a.metrics.Failed(time.Since(start), "failed", "permanent")
		log.Error("job failed permanently", "err", err, "duration", time.Since(start))
	case !errors.Is(err, bucket.ErrUnavailable) && a.cfg.MaxAttempts > 0 && job.Attempts+1 >= a.cfg.MaxAttempts:
		// Only failures of the job itself count: an outage or throttling
		// of the bucket is not the job's fault.
		if ferr := a.queue.Fail(job.ID, "gave up after "+strconv.Itoa(job.Attempts+1)+" attempts: "+err.Error(), now); errors.Is(ferr, queue.ErrRequeued) {
			log.Warn("upload failed, but the path was requested again meanwhile; queued again", "err", err)
			return
		} else if ferr != nil {
			log.Error("fail", "err", ferr)
		}
		a.metrics.Failed(time.Since(start), "failed", "transient")
		log.Error("job failed: attempts exhausted", "err", err)
	default:
		delay := a.backoff(job.Attempts + 1)
		ra, _ := bucket.RetryAfter(err)
		delay = max(delay, ra)
		class := "transient"
		switch {
		case bucket.IsThrottled(err):
			// The bucket's window has shrunk already; this job waits what
			// the store asked for, or its own backoff.
			class = "throttled"
		case errors.Is(err, bucket.ErrUnavailable) && a.bucketDown():
			// The bucket, not this job, is the problem: pause everyone and
			// probe. This job is due again as soon as a probe succeeds.
			a.setReachable(false)
			a.breaker.trip(now, ra)
			delay = ra
			class = "unavailable"
		}
		a.metrics.Failed(time.Since(start), "retry", class)
		if err := a.queue.RetryLater(job.ID, now.Add(delay), err.Error(), now); err != nil {
			log.Error("retry later", "err", err)
		}
		log.Warn("upload failed; will retry", "err", err, "class", class, "retry_in", delay.Round(time.Millisecond), "cache_paused", a.breaker.isOpen())
	}
}

// bucketDown tells a bucket that is down from one object that keeps
// failing: after an "unavailable" error it asks the bucket itself (one
// small request; concurrent askers share it). Only if that fails too are
// all uploads paused; otherwise the failing job keeps its own backoff and
// the others go on.
func (a *Agent) bucketDown() bool {
	if a.breaker.isOpen() {
		return true
	}
	ctx, cancel := context.WithTimeout(a.uploadCtx, 15*time.Second)
	defer cancel()
	err := a.uploader.Probe(ctx)
	return err != nil && (errors.Is(err, bucket.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded))
}

// backoff returns the delay before attempt number attempts+1: doubling
// from BackoffInitial, ±50% jitter, capped at BackoffMax.
func (a *Agent) backoff(attempts int) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = a.cfg.BackoffInitial
	b.Multiplier = 2
	b.MaxInterval = a.cfg.BackoffMax
	b.MaxElapsedTime = 0
	b.Reset()
	d := b.NextBackOff()
	for i := 1; i < attempts && i < 64; i++ {
		d = b.NextBackOff()
	}
	return min(d, a.cfg.BackoffMax) // jitter must not exceed the cap
}
