// Package e2e runs nixspool's binaries against the real parts: nix-build
// with the hook as post-build-hook, agentd, MinIO, and stock Nix reading the
// cache back.
package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/audit"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nixspool-e2e-bin-")
	if err != nil {
		panic(err)
	}
	// Tests run agentctl as other users too.
	if err := os.Chmod(dir, 0o755); err != nil {
		panic(err)
	}
	args := []string{"build", "-o", dir + "/"}
	if os.Getenv("NIXSPOOL_RACE") == "1" { // make test-race: race-checked daemons
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, "./cmd/hook", "./cmd/agentd", "./cmd/agentctl")...)
	cmd.Dir = testenv.RepoRoot()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build binaries:", err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func bin(name string) string { return filepath.Join(binDir, name) }

// keyPair makes a signing key pair with stock Nix.
func keyPair(t *testing.T, name string) (secretFile, public string) {
	t.Helper()
	dir := t.TempDir()
	env := testenv.NixEnv("")
	sk := testenv.Run(t, env, "nix", "key", "generate-secret", "--key-name", name)
	secretFile = filepath.Join(dir, "secret")
	if err := os.WriteFile(secretFile, []byte(sk), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nix", "key", "convert-secret-to-public")
	cmd.Env = env
	cmd.Stdin = strings.NewReader(sk)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	return secretFile, strings.TrimSpace(string(out))
}

// Agent is an agentd process under test.
type Agent struct {
	t        *testing.T
	Socket   string
	StateDir string
	args     []string
	env      []string
	cmd      *exec.Cmd
	log      *lockedBuffer
	done     chan struct{}
	// SkipAudit leaves out the final audit of the agent's cache (for a
	// second agent on a cache another one already audits).
	SkipAudit bool
	// AuditUpstream is a cache the final audit may find references in.
	AuditUpstream string
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newAgent prepares (does not start) an agentd with its own socket and
// state directory; extra are further flags, env its extra environment.
func newAgent(t *testing.T, cache, keyFile string, env []string, extra ...string) *Agent {
	t.Helper()
	dir := t.TempDir()
	a := &Agent{t: t, Socket: filepath.Join(dir, "run", "agentd.sock"), StateDir: filepath.Join(dir, "state"), log: &lockedBuffer{}}
	a.args = append([]string{"--cache", cache, "--secret-key-file", keyFile, "--socket", a.Socket, "--state-dir", a.StateDir,
		"--gc-roots", "off", "--backoff-max", "2s", "--spool-interval", "200ms"}, extra...)
	a.env = append(testenv.NixEnv(""), env...)
	// Every test that runs an agent ends with a deep audit of its whole
	// cache (after the agent is stopped: cleanups run last first).
	t.Cleanup(func() {
		if !t.Failed() && !a.SkipAudit {
			auditCache(t, cache, a.env, a.AuditUpstream)
		}
	})
	t.Cleanup(func() {
		a.Kill()
		if t.Failed() {
			t.Logf("agentd log:\n%s", a.log.String())
		}
	})
	return a
}

// auditCache runs `agentd audit --deep` on the cache and fails the test
// unless stock Nix could use everything in it. It returns the report.
func auditCache(t *testing.T, cache string, env []string, upstreams ...string) *audit.Report {
	t.Helper()
	args := []string{"audit", "--cache", cache, "--deep", "--json"}
	for _, u := range upstreams {
		if u != "" {
			args = append(args, "--upstream", u)
		}
	}
	cmd := exec.Command(bin("agentd"), args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var rep audit.Report
	if jerr := json.Unmarshal(stdout.Bytes(), &rep); jerr != nil {
		t.Fatalf("agentd audit: %v (%v)\n%s%s", err, jerr, stdout.String(), stderr.String())
	}
	if err != nil || !rep.OK() {
		var lines []string
		for _, p := range rep.Problems {
			lines = append(lines, p.String())
		}
		t.Fatalf("the cache audit found problems (%v):\n%s\n%s", err, strings.Join(lines, "\n"), rep.Summary())
	}
	t.Logf("%s", rep.Summary())
	return &rep
}

// Start starts agentd and waits until it answers on its socket.
func (a *Agent) Start() {
	a.t.Helper()
	cmd := exec.Command(bin("agentd"), a.args...)
	cmd.Env = a.env
	cmd.Stdout, cmd.Stderr = a.log, a.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		a.t.Fatal(err)
	}
	a.cmd = cmd
	a.done = make(chan struct{})
	go func() { cmd.Wait(); close(a.done) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-a.done:
			a.t.Fatalf("agentd exited during start-up:\n%s", a.log.String())
		default:
		}
		_, err := protocol.Call(a.Socket, &protocol.Request{Op: protocol.OpStatus}, time.Second)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			// Ask the Go runtime for a goroutine dump before giving up.
			cmd.Process.Signal(syscall.SIGQUIT)
			select {
			case <-a.done:
			case <-time.After(5 * time.Second):
			}
			a.t.Fatalf("agentd did not answer within 20s (last error: %v)", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Kill SIGKILLs agentd (no-op if not running).
func (a *Agent) Kill() {
	if a.cmd == nil {
		return
	}
	a.cmd.Process.Kill()
	<-a.done
	a.cmd = nil
}

// Stop sends SIGTERM and waits for a clean exit.
func (a *Agent) Stop() {
	a.t.Helper()
	if a.cmd == nil {
		return
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(40 * time.Second):
		a.t.Fatal("agentd did not stop within 40s of SIGTERM")
	}
	if code := a.cmd.ProcessState.ExitCode(); code != 0 {
		a.t.Fatalf("agentd exited %d after SIGTERM:\n%s", code, a.log.String())
	}
	a.cmd = nil
}

// HookEnv is what Nix must pass the hook so it finds this agentd (and
// roots what it spools where this agentd keeps its GC roots).
func (a *Agent) HookEnv() []string {
	roots := "off"
	for i, arg := range a.args {
		if arg == "--gc-roots" && i+1 < len(a.args) {
			roots = a.args[i+1]
		}
	}
	return []string{"NIXSPOOL_SOCKET=" + a.Socket, "NIXSPOOL_STATE_DIR=" + a.StateDir, "NIXSPOOL_GC_ROOTS=" + roots}
}

// Status runs `agentctl status --json`.
func (a *Agent) Status() protocol.Status {
	a.t.Helper()
	out, err := a.Ctl("status", "--json")
	if err != nil {
		a.t.Fatalf("agentctl status: %v\n%s", err, out)
	}
	var s protocol.Status
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		a.t.Fatalf("status JSON: %v\n%s", err, out)
	}
	return s
}

// Ctl runs agentctl against this agentd.
func (a *Agent) Ctl(args ...string) (string, error) {
	cmd := exec.Command(bin("agentctl"), append([]string{"--socket", a.Socket}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// WaitDrained waits until nothing is spooled, pending, uploading or
// retrying, and returns the final status.
func (a *Agent) WaitDrained(timeout time.Duration) protocol.Status {
	a.t.Helper()
	var s protocol.Status
	testenv.Poll(a.t, timeout, "the queue to drain", func() bool {
		s = a.Status()
		return s.Spooled.Files == 0 && s.Pending == 0 && s.Uploading == 0 && s.Retrying == 0
	})
	return s
}

// build runs nix-build on the graph with the hook configured and returns
// the top output path.
func build(t *testing.T, env []string, g *testenv.Graph) string {
	t.Helper()
	out := testenv.Run(t, env, "nix-build", g.File, "--no-out-link")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return lines[len(lines)-1]
}

// hookConfig is the nix.conf line that installs our hook.
func hookConfig() string { return "post-build-hook = " + bin("hook") + "\n" }

// verifyCache checks the cache with stock Nix: every path of top's closure
// verifies against the trusted key (contents and signature), and the whole
// closure substitutes into a fresh store.
func verifyCache(t *testing.T, cacheURL, pubKey, top string) {
	t.Helper()
	env := testenv.NixEnv("")
	testenv.Run(t, env, "nix", "store", "verify", "--store", cacheURL, "--trusted-public-keys", pubKey, "-r", top)
	fresh := filepath.Join(t.TempDir(), "fresh")
	testenv.Run(t, env, "nix", "copy", "--from", cacheURL, "--to", fresh, "--trusted-public-keys", pubKey, top)
	want := testenv.Requisites(t, env, top)
	for _, p := range want {
		if _, err := os.Lstat(filepath.Join(fresh, p)); err != nil {
			t.Errorf("%s was not substituted into the fresh store", p)
		}
	}
	if out, err := testenv.Output(env, "nix", "store", "verify", "--store", fresh, "-r", top, "--no-trust"); err != nil {
		t.Errorf("substituted closure does not verify: %v\n%s", err, out)
	}
}
