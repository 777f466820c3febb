package agent

import (
	"context"

	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/protocol"
)

// opList lists the queue's jobs, by state and source if asked.
func (a *Agent) opList(_ context.Context, c call) *protocol.Response {
	var source *queue.Source
	if c.req.Source != "" {
		s, err := queue.ParseSource(c.req.Source)
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		source = &s
	}
	jobs, err := a.queue.ListBy(queue.State(c.req.State), source, 10000)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	out := make([]protocol.Job, 0, len(jobs))
	for _, j := range jobs {
		out = append(out, jobView(j))
	}
	return &protocol.Response{Jobs: out}
}

// opRetry makes a failed or waiting job (or all of them) due now.
func (a *Agent) opRetry(_ context.Context, c call) *protocol.Response {
	if c.req.All {
		n, err := a.queue.RetryAll(a.now())
		if err != nil {
			return &protocol.Response{Error: err.Error()}
		}
		a.log.Info("retry requested", "jobs", n, "peer_uid", c.peer.uid)
		return &protocol.Response{Count: n}
	}
	if err := a.queue.Retry(c.req.ID, a.now()); err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	a.log.Info("retry requested", "job", c.req.ID, "peer_uid", c.peer.uid)
	return &protocol.Response{Count: 1}
}

// opDrop removes a job from the queue, stopping its upload if one runs.
func (a *Agent) opDrop(ctx context.Context, c call) *protocol.Response {
	j, err := a.jobs.drop(ctx, c.req.ID, c.peer.uid)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	return &protocol.Response{Count: 1, Jobs: []protocol.Job{jobView(*j)}}
}

func jobView(j queue.Job) protocol.Job {
	v := protocol.Job{ID: j.ID, Path: j.Path, Drv: j.Drv, State: string(j.State), Attempts: j.Attempts,
		EnqueuedAt: j.EnqueuedAt.Unix(), LastError: j.LastError, Source: j.Source.String()}
	if j.State == queue.StateReady && j.Attempts > 0 {
		v.State = "retrying"
		v.NotBefore = j.NotBefore.Unix()
	}
	return v
}
