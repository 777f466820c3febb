package agent

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The helper process of TestPeerCredentialsAtConnect: it takes the uid,
// gid and supplementary groups it is given, connects, and exits.
func TestPeerHelperProcess(t *testing.T) {
	sock := os.Getenv("NIXSPOOL_PEER_HELPER_SOCKET")
	if sock == "" {
		return
	}
	var groups []int
	for _, g := range strings.Fields(os.Getenv("NIXSPOOL_PEER_HELPER_GROUPS")) {
		n, _ := strconv.Atoi(g)
		groups = append(groups, n)
	}
	if err := syscall.Setgroups(groups); err != nil {
		os.Exit(2)
	}
	if err := syscall.Setgid(peerHelperGID); err != nil {
		os.Exit(3)
	}
	if err := syscall.Setuid(peerHelperUID); err != nil {
		os.Exit(4)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		os.Exit(5)
	}
	c.Close()
	os.Exit(0)
}

const (
	peerHelperUID = 65534
	peerHelperGID = 65533
)

// TestPeerCredentialsAtConnect: the uid, gid and supplementary groups of a
// peer come from the kernel as they were at connect time, also once the
// peer has exited (its pid, and /proc/PID, gone before agentd looks), and
// for more groups than peerGroups' first buffer holds.
func TestPeerCredentialsAtConnect(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the peer other credentials")
	}
	// Not t.TempDir: its parent is closed to other users.
	dir, err := os.MkdirTemp("", "nixspool-peer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	var want []int
	var arg []string
	for g := 70000; g < 70100; g++ { // more than the 64 of the first buffer
		want = append(want, g)
		arg = append(arg, strconv.Itoa(g))
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestPeerHelperProcess$")
	cmd.Env = append(os.Environ(), "NIXSPOOL_PEER_HELPER_SOCKET="+sock, "NIXSPOOL_PEER_HELPER_GROUPS="+strings.Join(arg, " "))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	l.(*net.UnixListener).SetDeadline(time.Now().Add(10 * time.Second))
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p, err := peerOf(c)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(p.groups)
	if !p.known || p.uid != peerHelperUID || p.gid != peerHelperGID || p.pid != cmd.Process.Pid || !slices.Equal(p.groups, want) {
		t.Fatalf("peer = uid %d gid %d pid %d (known %v) groups %v; want uid %d gid %d pid %d groups %v",
			p.uid, p.gid, p.pid, p.known, p.groups, peerHelperUID, peerHelperGID, cmd.Process.Pid, want)
	}
	if !p.inGroup(group{gid: 70099, set: true}) || p.inGroup(group{gid: 70100, set: true}) {
		t.Fatal("inGroup disagrees with the groups read")
	}
}
