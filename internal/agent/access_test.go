package agent

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/protocol"
)

func TestAccessTiers(t *testing.T) {
	const (
		pushers = 4242
		admins  = 4343
	)
	ac := access{ownUID: 990, socket: group{gid: pushers, name: "nixspool", set: true}, admin: group{gid: admins, name: "nixspool-admin", set: true}}
	root := peer{uid: 0, gid: 0, known: true}
	own := peer{uid: 990, gid: 990, known: true}
	pusher := peer{uid: 1001, gid: 100, groups: []int{pushers}, known: true}
	pusherByGID := peer{uid: 1002, gid: pushers, known: true}
	admin := peer{uid: 1003, gid: 100, groups: []int{pushers, admins}, known: true}
	other := peer{uid: 1004, gid: 100, groups: []int{100}, known: true}
	unknown := peer{}
	read := []string{protocol.OpStatus, protocol.OpList, protocol.OpDoctor, protocol.OpAudit, protocol.OpPins}
	push := []string{protocol.OpEnqueue, protocol.OpPush, protocol.OpWait}
	operate := []string{protocol.OpGC, protocol.OpForget, protocol.OpDrop, protocol.OpRetry, protocol.OpPin, protocol.OpUnpin}
	for _, c := range []struct {
		name                string
		p                   peer
		read, push, operate bool
	}{
		{"root", root, true, true, true},
		{"agentd's user", own, true, true, true},
		{"socket group (supplementary)", pusher, true, true, false},
		{"socket group (primary)", pusherByGID, true, true, false},
		{"admin group", admin, true, true, true},
		{"neither group", other, true, false, false},
		{"unknown peer", unknown, true, false, false},
	} {
		check := func(ops []string, want bool) {
			for _, op := range ops {
				why := ac.refusal(c.p, op)
				if (why == "") != want {
					t.Errorf("%s: %s: refusal %q, want allowed=%v", c.name, op, why, want)
				}
				if why != "" && !strings.Contains(why, op+" needs root") {
					t.Errorf("%s: %s: refusal %q does not say what %s needs", c.name, op, why, op)
				}
			}
		}
		check(read, c.read)
		check(push, c.push)
		check(operate, c.operate)
	}
	if why := ac.refusal(pusher, protocol.OpGC); why != "permission denied for uid 1001: gc needs root or agentd's user (uid 990) or group nixspool-admin" {
		t.Errorf("refusal of gc = %q", why)
	}
	if why := ac.refusal(other, protocol.OpPush); !strings.Contains(why, "push needs root or agentd's user (uid 990) or group nixspool or group nixspool-admin") {
		t.Errorf("refusal of push = %q", why)
	}
	if d := ac.describe(); d != "push, wait: root or agentd's user (uid 990) or group nixspool or group nixspool-admin; gc, forget, drop, retry, pin, unpin: root or agentd's user (uid 990) or group nixspool-admin" {
		t.Errorf("describe = %q", d)
	}
	rootOnly := access{ownUID: 0, socket: ac.socket}
	if why := rootOnly.refusal(admin, protocol.OpUnpin); why != "permission denied for uid 1003: unpin needs root (agentd has no --admin-group)" {
		t.Errorf("refusal without an admin group = %q", why)
	}
	if why := rootOnly.refusal(pusher, protocol.OpPush); why != "" {
		t.Errorf("a pusher is refused a push without an admin group: %q", why)
	}
	if why := (access{}).refusal(peer{uid: 1001, gid: 0, known: true}, protocol.OpPush); why == "" {
		t.Error("the zero access lets gid 0 push: an unset group must grant nothing")
	}
	if why := ac.refusal(root, "no-such-op"); why != `unknown operation "no-such-op"` {
		t.Errorf("refusal of an unknown operation = %q", why)
	}
}

// TestEveryOpHasATier: every operation of the protocol (each Op constant in
// package protocol) has a tier: one missing would be refused to everyone.
func TestEveryOpHasATier(t *testing.T) {
	fset := token.NewFileSet()
	names, err := filepath.Glob("../../protocol/*.go")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.CONST {
				continue
			}
			for _, spec := range g.Specs {
				for i, name := range spec.(*ast.ValueSpec).Names {
					if !strings.HasPrefix(name.Name, "Op") || !name.IsExported() {
						continue
					}
					lit, ok := spec.(*ast.ValueSpec).Values[i].(*ast.BasicLit)
					if !ok {
						t.Fatalf("protocol.%s is not a string literal", name.Name)
					}
					op, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					n++
					if _, ok := tiers[op]; !ok {
						t.Errorf("protocol.%s (%q) has no tier", name.Name, op)
					}
				}
			}
		}
	}
	if n < len(tiers) {
		t.Errorf("found %d operations in package protocol, fewer than the %d tiers list", n, len(tiers))
	}
}
