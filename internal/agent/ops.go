package agent

import (
	"context"

	"github.com/nixspool/nixspool/protocol"
)

// call is one request that dispatch allowed, with who made it and how
// long operations report progress to them.
type call struct {
	req      *protocol.Request
	peer     peer
	progress func(*protocol.Progress) error
}

// opHandler carries out one operation.
type opHandler func(a *Agent, ctx context.Context, c call) *protocol.Response

// ops maps each operation of the socket protocol to its handler.
var ops = map[string]opHandler{
	protocol.OpEnqueue: (*Agent).opEnqueue,
	protocol.OpPush:    (*Agent).opEnqueue,
	protocol.OpDoctor:  (*Agent).opDoctor,
	protocol.OpAudit:   (*Agent).opAudit,
	protocol.OpForget:  (*Agent).opForget,
	protocol.OpGC:      withKeepAlive((*Agent).opGC),
	protocol.OpPin:     withKeepAlive((*Agent).opPin),
	protocol.OpUnpin:   withKeepAlive((*Agent).opUnpin),
	protocol.OpPins:    withKeepAlive((*Agent).opPins),
	protocol.OpStatus:  (*Agent).opStatus,
	protocol.OpWait:    (*Agent).opWait,
	protocol.OpList:    (*Agent).opList,
	protocol.OpRetry:   (*Agent).opRetry,
	protocol.OpDrop:    (*Agent).opDrop,
}

// serveRequest carries out a request that dispatch allowed.
func (a *Agent) serveRequest(ctx context.Context, req *protocol.Request, p peer, progress func(*protocol.Progress) error) *protocol.Response {
	h, ok := ops[req.Op]
	if !ok {
		return &protocol.Response{Error: "unknown operation " + req.Op}
	}
	return h(a, ctx, call{req: req, peer: p, progress: progress})
}

func (a *Agent) opEnqueue(ctx context.Context, c call) *protocol.Response {
	return a.serveEnqueue(ctx, c.req, c.peer)
}

func (a *Agent) opDoctor(ctx context.Context, c call) *protocol.Response {
	return &protocol.Response{Checks: a.doctorOf().run(ctx, a.access.operator(c.peer))}
}

func (a *Agent) opAudit(ctx context.Context, c call) *protocol.Response {
	return a.audit(ctx, c.req, c.progress)
}

// opForget clears the presence cache.
func (a *Agent) opForget(_ context.Context, c call) *protocol.Response {
	n := a.uploader.Stats().KnownPresent
	if err := a.uploader.Forget(); err != nil {
		return &protocol.Response{Error: "forget: " + err.Error()}
	}
	a.log.Info("presence cache cleared by request", "paths", n, "peer_uid", c.peer.uid)
	return &protocol.Response{Count: n}
}

func (a *Agent) opStatus(context.Context, call) *protocol.Response {
	st, err := a.status()
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	return &protocol.Response{Status: st}
}

// opWait says, for each path, what its upload waits for.
func (a *Agent) opWait(ctx context.Context, c call) *protocol.Response {
	paths, _, err := parseRequest(a.cfg.StoreDir, c.req.Paths, "")
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	waits, err := a.pathWaits(ctx, paths)
	if err != nil {
		return &protocol.Response{Error: err.Error()}
	}
	return &protocol.Response{Waits: waits}
}
