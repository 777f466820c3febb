package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os/user"
	"strconv"
	"strings"
	"time"

	"github.com/nixspool/nixspool/protocol"
)

// tier is who may make a request.
type tier int

const (
	// tierRead: anyone who can connect (the socket's 0660 mode keeps
	// everyone else out).
	tierRead tier = iota
	// tierPush: root, agentd's user, the socket's group and the admin
	// group. Queueing only adds uploads to the shared cache.
	tierPush
	// tierOperate: root, agentd's user and the admin group. These change
	// or delete what others rely on: collect the cache, drop or retry
	// jobs, forget what the cache holds, pin and unpin.
	tierOperate
)

// tiers gives each operation its tier. An operation missing here is
// refused as "unknown operation", whoever asks (TestEveryOpHasATier keeps
// the list complete).
var tiers = map[string]tier{
	protocol.OpStatus: tierRead,
	protocol.OpList:   tierRead,
	protocol.OpDoctor: tierRead,
	protocol.OpAudit:  tierRead,
	protocol.OpPins:   tierRead,

	protocol.OpEnqueue: tierPush,
	protocol.OpPush:    tierPush,
	// How CI waits for what it pushed; it hands the waited-for jobs out
	// first (Queue.Want).
	protocol.OpWait: tierPush,

	protocol.OpGC:     tierOperate,
	protocol.OpForget: tierOperate,
	protocol.OpDrop:   tierOperate,
	protocol.OpRetry:  tierOperate,
	protocol.OpPin:    tierOperate,
	protocol.OpUnpin:  tierOperate,
}

// group is a group that grants access. The zero value is no group.
type group struct {
	gid  int
	name string
	set  bool
}

func (g group) String() string {
	if g.name != "" {
		return g.name
	}
	return strconv.Itoa(g.gid)
}

// lookupGroup resolves a group given by name or number.
func lookupGroup(flag, name string) (group, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			g, err = user.LookupGroupId(name)
		}
	}
	if err != nil {
		return group{}, fmt.Errorf("%s: %w", flag, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return group{}, fmt.Errorf("%s: group %s has gid %q", flag, name, g.Gid)
	}
	return group{gid: gid, name: g.Name, set: true}, nil
}

// groupOfGID names gid for messages; the number when it has no name.
func groupOfGID(gid int) group {
	if gid < 0 {
		return group{}
	}
	g := group{gid: gid, set: true}
	if gr, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		g.name = gr.Name
	}
	return g
}

// access decides who may make which request, from the peer's credentials
// as the kernel recorded them at connect time.
type access struct {
	ownUID int   // agentd's effective uid
	socket group // the socket's group: pushers
	admin  group // operators besides root and agentd's user
}

// refusal returns "" if p may make a request of op, else the one line
// that tells the caller what op needs.
func (ac access) refusal(p peer, op string) string {
	t, ok := tiers[op]
	if !ok {
		return fmt.Sprintf("unknown operation %q", op)
	}
	if t == tierRead {
		return ""
	}
	if ac.operator(p) {
		return ""
	}
	if t == tierPush && p.inGroup(ac.socket) {
		return ""
	}
	need := ac.who(t)
	if t == tierOperate && !ac.admin.set {
		need += " (agentd has no --admin-group)"
	}
	if !p.known {
		return fmt.Sprintf("permission denied: %s needs %s, and agentd could not tell who is calling", op, need)
	}
	return fmt.Sprintf("permission denied for uid %d: %s needs %s", p.uid, op, need)
}

// operator reports whether p may make every request: root, agentd's user
// or a member of the admin group.
func (ac access) operator(p peer) bool {
	return p.known && (p.uid == 0 || p.uid == ac.ownUID || p.inGroup(ac.admin))
}

// who names those who may make requests of tier t.
func (ac access) who(t tier) string {
	who := []string{"root"}
	if ac.ownUID != 0 {
		who = append(who, fmt.Sprintf("agentd's user (uid %d)", ac.ownUID))
	}
	if t == tierPush && ac.socket.set {
		who = append(who, "group "+ac.socket.String())
	}
	if ac.admin.set {
		who = append(who, "group "+ac.admin.String())
	}
	return strings.Join(who, " or ")
}

// describe is doctor's line on who may do what.
func (ac access) describe() string {
	return fmt.Sprintf("push, wait: %s; gc, forget, drop, retry, pin, unpin: %s", ac.who(tierPush), ac.who(tierOperate))
}

// operatorArgs returns the arguments of an operator's request, for its
// log line.
func operatorArgs(req *protocol.Request) slog.Attr {
	var args []any
	if req.ID != 0 {
		args = append(args, "id", req.ID)
	}
	if req.All {
		args = append(args, "all", true)
	}
	if req.Name != "" {
		args = append(args, "name", req.Name)
	}
	if len(req.Paths) > 0 {
		args = append(args, "paths", req.Paths)
	}
	if req.Op == protocol.OpGC {
		args = append(args, "keep_since", req.KeepSince.String(), "grace", req.Grace.String(), "dry_run", req.DryRun)
	}
	return slog.Group("args", args...)
}

// logOperatorAction records one operator's request once it is answered:
// who, what, with which arguments, and how it ended.
func (a *Agent) logOperatorAction(ctx context.Context, req *protocol.Request, p peer, resp *protocol.Response, d time.Duration) {
	outcome, level := "ok", slog.LevelInfo
	attrs := []any{"op", req.Op, "peer_uid", p.uid, "peer_pid", p.pid, operatorArgs(req)}
	if resp.Error != "" {
		outcome, level = "failed", slog.LevelWarn
		attrs = append(attrs, "err", resp.Error)
	} else {
		attrs = append(attrs, "count", resp.Count)
	}
	attrs = append(attrs, "outcome", outcome, "duration", d)
	a.log.Log(ctx, level, "operator action", attrs...)
	a.metrics.OperatorAction(req.Op, outcome)
}
