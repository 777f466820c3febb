package e2e

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
)

// TestSystemdNotify runs agentd as systemd would for Type=notify with a
// watchdog: READY=1 comes once agentd serves, without waiting for the spool
// (a large spool or a Nix daemon that stops answering would otherwise hold
// the start past TimeoutStartSec); the spool is imported after it, every
// path of it uploaded. STATUS= lines and WATCHDOG=1 pings follow, and
// SIGTERM sends STOPPING=1.
func TestSystemdNotify(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-notify-1")
	notify, msgs := testenv.NotifySocket(t)
	daemon := testenv.StartNixDaemon(t, testenv.NixEnv(""))
	gate := startGate(t, daemon.Socket) // the daemon does not answer until opened

	a := newAgent(t, "file://"+filepath.Join(t.TempDir(), "cache"), sk, []string{"NOTIFY_SOCKET=" + notify, "WATCHDOG_USEC=300000"},
		"--nix-daemon-socket", gate.socket)
	// Requests spooled before the start: three files of 40 paths.
	var paths []string
	for i := range 3 {
		ps := addTextPaths(t, fmt.Sprintf("notify%d", i), 40)
		if _, err := spool.Write(filepath.Join(a.StateDir, "spool"), spool.Entry{Paths: ps}); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, ps...)
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
			seen[key]++
		case <-deadline:
			t.Fatalf("with the Nix daemon not answering, messages so far: %v", seen)
		}
	}
	if files, _ := spool.Files(filepath.Join(a.StateDir, "spool")); len(files) != 3 {
		t.Fatalf("%d spool files left, want all 3 (the Nix daemon has not answered yet)", len(files))
	}
	gate.open()
	testenv.Poll(t, 2*time.Minute, "the spooled paths to upload", func() bool {
		files, _ := spool.Files(filepath.Join(a.StateDir, "spool"))
		s := a.Status()
		return len(files) == 0 && s.Uploaded == uint64(len(paths)) && s.Pending == 0 && s.Uploading == 0
	})
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

// addTextPaths adds n small store paths named name-<i>-<unique> with one
// nix-store call.
func addTextPaths(t *testing.T, name string, n int) []string {
	t.Helper()
	dir := t.TempDir()
	args := []string{"--add"}
	for i := range n {
		f := filepath.Join(dir, fmt.Sprintf("%s-%d-%s", name, i, testenv.Unique()))
		if err := os.WriteFile(f, []byte(f+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, f)
	}
	paths := strings.Fields(testenv.Run(t, testenv.NixEnv(""), "nix-store", args...))
	if len(paths) != n {
		t.Fatalf("nix-store --add gave %d paths, want %d", len(paths), n)
	}
	return paths
}

// gate is a unix socket in front of a Nix daemon's that holds every
// connection unanswered until opened: a daemon that stopped answering.
type gate struct {
	socket string
	opened chan struct{}
	once   sync.Once
}

func startGate(t *testing.T, target string) *gate {
	t.Helper()
	g := &gate{socket: filepath.Join(t.TempDir(), "gate.sock"), opened: make(chan struct{})}
	l, err := net.Listen("unix", g.socket)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var conns sync.WaitGroup
	t.Cleanup(func() { close(done); l.Close(); conns.Wait() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				select {
				case <-g.opened:
				case <-done:
					return
				}
				d, err := net.Dial("unix", target)
				if err != nil {
					return
				}
				defer d.Close()
				go func() { <-done; c.Close(); d.Close() }()
				go func() { io.Copy(d, c); d.Close() }()
				io.Copy(c, d)
			}()
		}
	}()
	return g
}

func (g *gate) open() { g.once.Do(func() { close(g.opened) }) }

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
