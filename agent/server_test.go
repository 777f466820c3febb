package agent

import (
	"os"
	"testing"
)

func TestMayMutate(t *testing.T) {
	a := &Agent{sockGID: 4242}
	for _, c := range []struct {
		p    peer
		want bool
	}{
		{peer{known: false}, false},
		{peer{uid: 0, gid: 0, known: true}, true},
		{peer{uid: os.Geteuid(), gid: 1, known: true}, true},
		{peer{uid: 65534, gid: 65534, pid: -1, known: true}, false},
		{peer{uid: 65534, gid: 4242, pid: -1, known: true}, true},
	} {
		if got := a.mayMutate(c.p); got != c.want {
			t.Errorf("mayMutate(%+v) = %v, want %v", c.p, got, c.want)
		}
	}
	noGroup := &Agent{sockGID: -1}
	if noGroup.mayMutate(peer{uid: 65534, gid: 4242, known: true}) {
		t.Error("without a socket group only root and agentd's user may mutate")
	}
}
