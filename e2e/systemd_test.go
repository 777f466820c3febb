package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/spool"
)

// TestSystemdNotify runs agentd as systemd would for Type=notify with a
// watchdog: READY=1 comes only after the spool was imported, STATUS= lines
// and WATCHDOG=1 pings follow, and SIGTERM sends STOPPING=1.
func TestSystemdNotify(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-notify-1")
	notify, msgs := testenv.NotifySocket(t)

	a := newAgent(t, "file://"+filepath.Join(t.TempDir(), "cache"), sk, []string{"NOTIFY_SOCKET=" + notify, "WATCHDOG_USEC=300000"})
	// A spooled request from before the start must be imported before READY.
	p := testenv.AddTextPath(t, "notify", "x\n")
	if _, err := spool.Write(filepath.Join(a.StateDir, "spool"), spool.Entry{Paths: []string{p}}); err != nil {
		t.Fatal(err)
	}
	a.Start()
	seen := map[string]int{}
	deadline := time.After(10 * time.Second)
	for seen["READY=1"] == 0 || seen["WATCHDOG=1"] < 2 || seen["STATUS"] == 0 {
		select {
		case m := <-msgs:
			key := m
			if strings.HasPrefix(m, "STATUS=") {
				key = "STATUS"
			}
			if m == "READY=1" && seen["READY=1"] == 0 {
				if files, _ := spool.Files(filepath.Join(a.StateDir, "spool")); len(files) != 0 {
					t.Fatal("READY=1 before the spool was imported")
				}
			}
			seen[key]++
		case <-deadline:
			t.Fatalf("messages so far: %v", seen)
		}
	}
	a.Stop()
	for {
		select {
		case m := <-msgs:
			if m == "STOPPING=1" {
				return
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no STOPPING=1 after SIGTERM")
		}
	}
}

// TestSocketActivation passes a listening socket to agentd as systemd does
// (LISTEN_FDS/LISTEN_PID, fd 3). A hook that connects before agentd runs
// waits in the listen backlog and is served once agentd starts.
func TestSocketActivation(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-activation-1")
	dir := t.TempDir()
	sock := filepath.Join(dir, "activated.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()

	// The hook fires while no agentd is running: it must wait, not fail.
	p := testenv.AddTextPath(t, "activation", "y\n")
	hook := exec.Command(bin("hook"))
	hook.Env = append(os.Environ(), "OUT_PATHS="+p, "NIXSPOOL_SOCKET="+sock, "NIXSPOOL_STATE_DIR="+filepath.Join(dir, "hookstate"), "NIXSPOOL_TIMEOUT=20s", "NIXSPOOL_STRICT=1")
	hookOut := &lockedBuffer{}
	hook.Stdout, hook.Stderr = hookOut, hookOut
	if err := hook.Start(); err != nil {
		t.Fatal(err)
	}
	hookDone := make(chan error, 1)
	go func() { hookDone <- hook.Wait() }()

	state := filepath.Join(dir, "state")
	args := []string{"--cache", "file://" + filepath.Join(dir, "cache"), "--secret-key-file", sk, "--state-dir", state, "--gc-roots", "off", "--socket", filepath.Join(dir, "unused.sock")}
	// LISTEN_PID must be agentd's pid: let the shell set it, then exec.
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`, bin("agentd")}, args...)...)
	cmd.Env = testenv.NixEnv("")
	cmd.ExtraFiles = []*os.File{lf} // becomes fd 3
	logs := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	select {
	case err := <-hookDone:
		if err != nil {
			t.Fatalf("hook failed: %v\n%s\nagentd:\n%s", err, hookOut.String(), logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("hook still waiting\nagentd:\n%s", logs.String())
	}
	if strings.Contains(hookOut.String(), "spooled") {
		t.Fatalf("hook spooled instead of waiting for agentd: %s", hookOut.String())
	}
	if !strings.Contains(logs.String(), "socket-activated listener") {
		t.Fatalf("agentd did not use the passed socket:\n%s", logs.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "unused.sock")); err == nil {
		t.Fatal("agentd created its own socket although one was passed")
	}
	testenv.Poll(t, 30*time.Second, "the path to upload", func() bool {
		resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpStatus}, time.Second)
		return err == nil && resp.Status.Uploaded == 1
	})
}
