package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/nixspool/nixspool/protocol"
)

// connDeadline bounds one connection: a client that sends nothing (or
// sends slowly) cannot hold a handler for longer.
const connDeadline = 10 * time.Second

// serve accepts connections until the listener closes, within the
// connection limits (a connection over them gets a one-line refusal), and
// returns once every request it took has been handled: they use the queue,
// which is closed after serve returns.
func (a *Agent) serve(ctx context.Context) {
	if a.conns == nil {
		a.conns = newConnLimits(maxConns, maxConnsPerUID, largeRequests)
	}
	var handlers sync.WaitGroup
	defer handlers.Wait()
	for {
		c, err := a.listener.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			a.log.Error("accept", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		p, err := peerOf(c)
		switch {
		case err == nil:
		case errors.Is(err, errNoPeerGroups):
			if !a.groupsWarned.Swap(true) { // once: the kernel will not change
				a.log.Warn("peer groups unknown", "err", err)
			}
		default:
			a.log.Warn("peer credentials unknown; the connection may only read", "err", err)
		}
		release, refusal := a.conns.admit(p)
		if refusal != "" {
			a.log.Warn("connection refused", "reason", refusal, "peer_uid", p.uid, "peer_pid", p.pid)
			refuse(c, refusal)
			continue
		}
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			defer release()
			a.handle(ctx, c, p)
		}()
	}
}

// refuse answers a connection over the limits with reason and closes it,
// without reading its request. The write goes to an empty socket buffer;
// its short deadline only guards the accept loop against the unexpected.
func refuse(c net.Conn, reason string) {
	defer c.Close()
	b, err := protocol.Encode(&protocol.Response{V: protocol.Version, Error: reason})
	if err != nil {
		return
	}
	c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	c.Write(b)
}

func (a *Agent) handle(ctx context.Context, c net.Conn, p peer) {
	defer c.Close()
	defer func() {
		// A bug in one request's handling must not take agentd down: the
		// request fails, the stack goes to the log, agentd keeps serving.
		if r := recover(); r != nil {
			a.log.Error("request handler panicked; agentd keeps serving", "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			c.SetWriteDeadline(time.Now().Add(connDeadline))
			if b, err := protocol.Encode(&protocol.Response{V: protocol.Version, Error: "internal error (logged by agentd)"}); err == nil {
				c.Write(b)
			}
		}
	}()
	req, release, err := a.readRequest(ctx, c)
	defer release()
	var resp *protocol.Response
	if err != nil {
		a.log.Warn("bad request", "err", err, "peer_uid", p.uid, "peer_pid", p.pid)
		resp = &protocol.Response{Error: "bad request: " + err.Error()}
	} else {
		resp = a.dispatch(ctx, req, p, a.progressWriter(c))
	}
	resp.V = protocol.Version
	resp.OK = resp.Error == ""
	c.SetWriteDeadline(time.Now().Add(connDeadline))
	b, err := protocol.Encode(resp)
	if err == nil {
		_, err = c.Write(b)
	}
	if err != nil {
		a.log.Debug("write reply", "err", err)
	}
}

// readRequest reads the connection's request within connDeadline. A
// request over protocol.SmallRequestSize waits (within the same deadline)
// for one of the slots for large requests; the slot is held until the
// connection is done (the caller calls release), as the decoded request is
// about as large. Shutdown ends a read that waits on the client.
func (a *Agent) readRequest(ctx context.Context, c net.Conn) (req *protocol.Request, release func(), err error) {
	deadline := time.Now().Add(connDeadline)
	c.SetDeadline(deadline)
	rctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Now()) })
	defer stop()
	grow, release := a.conns.growRequest(rctx)
	req, err = protocol.ReadRequestGrowing(c, grow)
	return req, release, err
}

// progressWriter returns the function long operations report progress
// with: it lifts the connection's overall deadline (the operation may take
// minutes) and writes each report as a line, failing once the client has
// gone away.
func (a *Agent) progressWriter(c net.Conn) func(*protocol.Progress) error {
	lifted := false
	return func(pr *protocol.Progress) error {
		if !lifted {
			c.SetDeadline(time.Time{})
			lifted = true
		}
		b, err := protocol.Encode(&protocol.Response{V: protocol.Version, Progress: pr})
		if err != nil {
			return err
		}
		c.SetWriteDeadline(time.Now().Add(connDeadline))
		_, err = c.Write(b)
		return err
	}
}

// dispatch answers a request the peer may make (see access): a refused one
// gets the one line that says what it needs, and an operator's request is
// logged and counted once answered.
func (a *Agent) dispatch(ctx context.Context, req *protocol.Request, p peer, progress func(*protocol.Progress) error) *protocol.Response {
	operator := tiers[req.Op] == tierOperate
	if refusal := a.access.refusal(p, req.Op); refusal != "" {
		a.log.Warn("request refused", "op", req.Op, "reason", refusal, "peer_uid", p.uid, "peer_pid", p.pid)
		if operator {
			a.metrics.OperatorAction(req.Op, "refused")
		}
		return &protocol.Response{Error: refusal}
	}
	if !operator {
		return a.serveRequest(ctx, req, p, progress)
	}
	start := time.Now()
	resp := a.serveRequest(ctx, req, p, progress)
	a.logOperatorAction(ctx, req, p, resp, time.Since(start))
	return resp
}
