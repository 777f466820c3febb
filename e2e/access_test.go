package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

// addGroup creates a system group, removed when the test ends.
func addGroup(t *testing.T, name string) {
	t.Helper()
	if out, err := exec.Command("groupadd", name).CombinedOutput(); err != nil {
		t.Fatalf("groupadd %s: %v\n%s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("groupdel", name).CombinedOutput(); err != nil {
			t.Errorf("groupdel %s: %v\n%s", name, err, out)
		}
	})
}

// ctl runs agentctl against a as this user; it returns agentctl's output
// and pid.
func (u localUser) ctl(a *Agent, args ...string) (out string, pid int, err error) {
	cmd := exec.Command(bin("agentctl"), append([]string{"--socket", a.Socket}, args...)...)
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid), Groups: u.groups}}
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err = cmd.Start()
	if err == nil {
		pid = cmd.Process.Pid
		err = cmd.Wait()
	}
	return b.String(), pid, err
}

// worldReachableSocket moves a's socket into a directory other users can
// traverse (a test's temporary directories are closed to them).
func worldReachableSocket(t *testing.T, a *Agent) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nixspool-access-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	a.Socket = filepath.Join(dir, "agentd.sock")
	a.args = append(a.args, "--socket", a.Socket) // the last one counts
}

// TestAccessTiersRealUsers runs agentctl as users the test creates: a
// member of the socket's group (a pusher) may push and read, and is refused
// gc, forget, drop, retry, pin and unpin with a line that says what they
// need; a member of --admin-group may run them, each logged and counted; a
// user in neither group cannot connect at all.
func TestAccessTiersRealUsers(t *testing.T) {
	testenv.RequireNix(t)
	if os.Geteuid() != 0 {
		t.Skip("creating users needs root")
	}
	for _, tool := range []string{"useradd", "userdel", "groupadd", "groupdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, tool)
		}
	}
	id := testenv.Unique()
	pushGroup, adminGroup := "nspg-push-"+id, "nspg-admin-"+id
	addGroup(t, pushGroup)
	addGroup(t, adminGroup)
	pusher := addUser(t, "nspu-pusher-"+id, pushGroup)
	admin := addUser(t, "nspu-admin-"+id, pushGroup, adminGroup)
	outsider := addUser(t, "nspu-other-"+id)

	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-access-1")
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--socket-group", pushGroup, "--admin-group", adminGroup,
		"--metrics-listen", metricsAddr, "--gc-poll-interval", "200ms")
	worldReachableSocket(t, a)
	a.Start()

	// A pusher pushes, waits, and reads.
	pushed := testenv.AddTextPath(t, "access-pushed", "pushed by a member of the socket's group "+id)
	if out, _, err := pusher.ctl(a, "push", pushed); err != nil || !strings.Contains(out, "queued "+pushed) {
		t.Fatalf("push as a pusher: %v\n%s", err, out)
	}
	if out, _, err := pusher.ctl(a, "wait", "--timeout", "1m"); err != nil {
		t.Fatalf("wait as a pusher: %v\n%s", err, out)
	}
	verifyCache(t, m.HTTPURL(), pk, pushed)
	for _, args := range [][]string{{"status", "--json"}, {"list"}, {"pins"}} {
		if out, _, err := pusher.ctl(a, args...); err != nil {
			t.Errorf("%s as a pusher: %v\n%s", args[0], err, out)
		}
	}
	out, _, err := pusher.ctl(a, "doctor")
	if access := fmt.Sprintf("push, wait: root or group %s or group %s; gc, forget, drop, retry, pin, unpin: root or group %s", pushGroup, adminGroup, adminGroup); err != nil || !strings.Contains(out, access) {
		t.Errorf("doctor as a pusher: %v, want the line %q:\n%s", err, access, out)
	}
	// A pusher's doctor only reads: no probe object, GC root or file.
	if !regexp.MustCompile(`write probes +not run`).MatchString(out) || strings.Contains(out, "put, head and delete") || !strings.Contains(out, "StoreDir: /nix/store") {
		t.Errorf("doctor as a pusher probed writes, or did not say it did not:\n%s", out)
	}
	if out, _, err := admin.ctl(a, "doctor"); err != nil || !strings.Contains(out, "put, head and delete of a probe object work") || strings.Contains(out, "write probes") {
		t.Errorf("doctor as an operator: %v, want the write probes:\n%s", err, out)
	}

	// ... and is refused what operators do.
	refusedPIDs := map[string]int{}
	for _, args := range [][]string{
		{"gc", "--keep-since", "30d", "--grace", "4s"},
		{"forget"},
		{"drop", "1"},
		{"unpin", "anything"},
		{"retry", "--all"},
		{"pin", "mine", pushed},
	} {
		out, pid, err := pusher.ctl(a, args...)
		want := fmt.Sprintf("permission denied for uid %d: %s needs root or group %s", pusher.uid, args[0], adminGroup)
		if err == nil || strings.TrimSpace(out) != "agentctl: "+want {
			t.Errorf("%s as a pusher: %v, want refused with %q; got:\n%s", args[0], err, want, out)
		}
		refusedPIDs[args[0]] = pid
	}

	// A user in neither group does not reach agentd at all.
	out, _, err = outsider.ctl(a, "status")
	if err == nil || !strings.Contains(out, "permission denied on "+a.Socket) {
		t.Errorf("status as a user in neither group: %v\n%s", err, out)
	}

	// An operator (the admin group) runs them.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"pin", "kept", pushed}, "kept"},
		{[]string{"unpin", "kept"}, "unpinned kept"},
		{[]string{"forget"}, "forgot"},
		{[]string{"retry", "--all"}, "0 job(s) queued again"},
		{[]string{"gc", "--keep-since", "30d", "--grace", "4s"}, ""},
	} {
		if out, _, err := admin.ctl(a, c.args...); err != nil || !strings.Contains(out, c.want) {
			t.Fatalf("%s as an operator: %v\n%s", c.args[0], err, out)
		}
	}
	// A job still queued (the cache is down) is dropped by the operator.
	m.Stop()
	held := testenv.AddTextPath(t, "access-dropped", "dropped by an operator "+id)
	out, _, err = pusher.ctl(a, "push", held)
	match := regexp.MustCompile(`\(job (\d+),`).FindStringSubmatch(out)
	if err != nil || match == nil {
		t.Fatalf("push while the cache is down: %v\n%s", err, out)
	}
	out, adminPID, err := admin.ctl(a, "drop", match[1])
	m.Start()
	if err != nil || !strings.Contains(out, "dropped job "+match[1]+" ("+held+")") {
		t.Fatalf("drop as an operator: %v\n%s", err, out)
	}

	// Refusals are logged with uid and pid; operator actions as one line
	// with the caller, the arguments and the outcome.
	logs := a.log.String()
	for op, pid := range refusedPIDs {
		want := fmt.Sprintf("op=%s reason=\"permission denied for uid %d: %s needs root or group %s\" peer_uid=%d peer_pid=%d", op, pusher.uid, op, adminGroup, pusher.uid, pid)
		if !strings.Contains(logs, want) {
			t.Errorf("no log line with %q", want)
		}
	}
	for _, want := range []string{
		fmt.Sprintf(`msg="operator action" op=gc peer_uid=%d`, admin.uid),
		"args.keep_since=720h0m0s args.grace=4s args.dry_run=false count=0 outcome=ok",
		fmt.Sprintf(`msg="operator action" op=drop peer_uid=%d peer_pid=%d args.id=%s count=1 outcome=ok`, admin.uid, adminPID, match[1]),
		fmt.Sprintf(`msg="operator action" op=pin peer_uid=%d`, admin.uid),
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("no log line with %q", want)
		}
	}
	if strings.Contains(logs, fmt.Sprintf("peer_uid=%d ", outsider.uid)) {
		t.Error("agentd saw a request of the user in neither group")
	}

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`nixspool_operator_actions_total{op="gc",outcome="refused"} 1`,
		`nixspool_operator_actions_total{op="gc",outcome="ok"} 1`,
		`nixspool_operator_actions_total{op="drop",outcome="refused"} 1`,
		`nixspool_operator_actions_total{op="drop",outcome="ok"} 1`,
		`nixspool_operator_actions_total{op="unpin",outcome="ok"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	a.WaitDrained(time.Minute)
}
