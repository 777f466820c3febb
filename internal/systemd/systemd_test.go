package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

func expect(t *testing.T, msgs <-chan string, want string) {
	t.Helper()
	select {
	case got := <-msgs:
		if got != want {
			t.Fatalf("notify message %q, want %q", got, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no notify message, want %q", want)
	}
}

func TestNotify(t *testing.T) {
	path, msgs := testenv.NotifySocket(t)
	t.Setenv("NOTIFY_SOCKET", path)
	Ready()
	expect(t, msgs, "READY=1")
	Status("3 pending, 0 failed")
	expect(t, msgs, "STATUS=3 pending, 0 failed")
	Watchdog()
	expect(t, msgs, "WATCHDOG=1")
	Stopping()
	expect(t, msgs, "STOPPING=1")
}

func TestNotifyOutsideSystemd(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	Ready() // must not fail or block
	if l, err := Listener(); l != nil || err != nil {
		t.Fatalf("Listener outside systemd = %v, %v", l, err)
	}
	if WatchdogInterval() != 0 {
		t.Fatal("watchdog on outside systemd")
	}
}

func TestWatchdogInterval(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "400000")
	t.Setenv("WATCHDOG_PID", "")
	if got := WatchdogInterval(); got != 200*time.Millisecond {
		t.Fatalf("WatchdogInterval = %v, want half of 400ms", got)
	}
}

// TestUnitFilesVerify runs systemd-analyze verify on the shipped units
// (systemd/ at the repository root).
func TestUnitFilesVerify(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		testenv.Missing(t, "systemd-analyze")
	}
	dir := t.TempDir()
	for _, name := range []string{"nixspool.socket", "nixspool.service"} {
		data, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		// verify checks that ExecStart exists; point it at a real binary.
		text := strings.ReplaceAll(string(data), "/usr/local/bin/agentd", "/bin/true")
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(analyze, "verify", filepath.Join(dir, "nixspool.socket"), filepath.Join(dir, "nixspool.service"))
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
