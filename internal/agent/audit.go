package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/nixspool/nixspool/internal/audit"
	"github.com/nixspool/nixspool/protocol"
)

// maxAuditProblems bounds the problems sent back to agentctl; the summary
// still counts them all.
const maxAuditProblems = 10000

// audit runs a read-only audit of the cache and answers with the report.
// It stops if the client goes away.
func (a *Agent) audit(ctx context.Context, req *protocol.Request, progress func(*protocol.Progress) error) *protocol.Response {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	keys, err := audit.ParsePublicKeys(req.Keys)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	start := time.Now()
	rep, err := audit.Run(ctx, a.bucket, audit.Options{
		Deep:        req.Deep,
		TrustedKeys: keys,
		Progress: func(done, total int) {
			if progress(&protocol.Progress{Stage: "narinfos", Done: int64(done), Total: int64(total)}) != nil {
				cancel()
			}
		},
	})
	if err != nil {
		a.log.Warn("audit failed", "err", err)
		return &protocol.Response{Error: "audit: " + err.Error()}
	}
	a.log.Info("audit done", "deep", req.Deep, "narinfos", rep.Narinfos, "problems", len(rep.Problems), "requests", rep.Requests, "duration", time.Since(start))
	if len(rep.Problems) > maxAuditProblems {
		rep.Problems = rep.Problems[:maxAuditProblems]
	}
	data, err := json.Marshal(rep)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	return &protocol.Response{Result: data, Count: len(rep.Problems)}
}
