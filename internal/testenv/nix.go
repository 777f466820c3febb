package testenv

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"time"
)

// NixConfig is the configuration tests run Nix with: no sandbox and no
// build users (root in a container), no substituters.
const NixConfig = "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\nsubstituters =\n"

// RequireNix skips (or, with NIXSPOOL_REQUIRE_TOOLS=1, fails) a test when
// the Nix tools or root privileges are missing.
func RequireNix(t T) {
	t.Helper()
	if _, err := exec.LookPath("nix-build"); err != nil {
		Missing(t, "nix-build (Debian's nix-bin)")
	}
	if os.Geteuid() != 0 {
		Missing(t, "root (the tests use the real /nix store)")
	}
}

// NixEnv returns the environment for Nix commands with extra lines added to
// NIX_CONFIG and extra variables.
func NixEnv(extraConfig string, extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "NIX_CONFIG=") || strings.HasPrefix(kv, "NIX_REMOTE=") || strings.HasPrefix(kv, "NIX_DAEMON_SOCKET_PATH=") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "NIX_CONFIG="+NixConfig+extraConfig)
	return append(env, extra...)
}

// Run runs a command and returns its standard output (Nix prints
// warnings such as "SQLite database is busy" on stderr); it fails the test
// with both outputs if the command fails.
func Run(t T, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = env
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// Output runs a command and returns its combined output.
func Output(env []string, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Graph is a Nix expression with a small derivation graph.
type Graph struct {
	File  string
	Nonce string
}

// WriteGraph writes a derivation graph of 12 outputs over 4 levels, with
// a multi-output derivation, whose outputs reference each other (so the
// store records references). big adds a 1 MiB random file to some outputs.
// Every call builds new paths (a fresh nonce).
func WriteGraph(t T, dir string, big bool) *Graph {
	t.Helper()
	nonce := Unique()
	blob := ""
	if big {
		blob = `/usr/bin/head -c 1048576 /dev/urandom > $out/blob;`
	}
	expr := fmt.Sprintf(`
let
  mk = name: deps: extra: builtins.derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      echo "building ${name}"
      mkdir -p $out
      echo ${name} > $out/name
      for d in ${toString deps}; do echo $d >> $out/deps; done
      ${extra}
    '' ];
    nonce = "%[1]s";
    PATH = "/usr/bin:/bin";
  });
  leaf1 = mk "leaf1" [] "";
  leaf2 = mk "leaf2" [] "%[2]s";
  leaf3 = mk "leaf3" [] "";
  mid1 = mk "mid1" [ leaf1 leaf2 ] "";
  mid2 = mk "mid2" [ leaf2 leaf3 ] "%[2]s";
  multi = builtins.derivation {
    name = "multi";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "dev" "doc" ];
    args = [ "-c" "mkdir -p $out $dev $doc; echo ${mid1} > $out/ref; echo $out > $dev/ref; echo doc > $doc/readme" ];
    nonce = "%[1]s";
    PATH = "/usr/bin:/bin";
  };
  up1 = mk "up1" [ mid1 multi.dev ] "";
  up2 = mk "up2" [ mid2 multi ] "";
  top = mk "top" [ up1 up2 multi.doc ] "";
in top
`, nonce, blob)
	f := filepath.Join(dir, "graph-"+nonce+".nix")
	if err := os.WriteFile(f, []byte(expr), 0o644); err != nil {
		t.Fatalf("%v", err)
	}
	return &Graph{File: f, Nonce: nonce}
}

// GraphPaths is how many store outputs WriteGraph's graph has.
const GraphPaths = 11

// Requisites returns the closure of p according to the local store.
func Requisites(t T, env []string, p string) []string {
	t.Helper()
	return strings.Fields(Run(t, env, "nix-store", "-q", "--requisites", p))
}

// NixDaemon is a nix-daemon on a private socket, as on NixOS.
type NixDaemon struct {
	Socket string
	env    []string
	log    *os.File
	cmd    *exec.Cmd
}

// StartNixDaemon starts nix-daemon listening on a private socket with env
// (which carries its NIX_CONFIG, e.g. the post-build-hook) and stops it at
// cleanup. Clients use ClientEnv.
func StartNixDaemon(t T, env []string) *NixDaemon {
	t.Helper()
	d := &NixDaemon{Socket: filepath.Join(t.TempDir(), "nix-daemon.sock"), env: env}
	logf, err := os.Create(filepath.Join(t.TempDir(), "nix-daemon.log"))
	if err != nil {
		t.Fatalf("%v", err)
	}
	d.log = logf
	t.Cleanup(func() {
		d.stop()
		logf.Close()
	})
	d.start(t)
	return d
}

func (d *NixDaemon) start(t T) {
	t.Helper()
	cmd := exec.Command("nix-daemon")
	cmd.Env = append(d.env, "NIX_DAEMON_SOCKET_PATH="+d.Socket)
	cmd.Stdout, cmd.Stderr = d.log, d.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("%v", err)
	}
	d.cmd = cmd
	Poll(t, 20*time.Second, "nix-daemon socket", func() bool {
		fi, err := os.Stat(d.Socket)
		return err == nil && fi.Mode()&os.ModeSocket != 0
	})
}

// stop kills the daemon and the processes serving its connections (each
// in a session of its own).
func (d *NixDaemon) stop() {
	if d.cmd == nil {
		return
	}
	workers := childrenOf(d.cmd.Process.Pid)
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	for _, pid := range workers {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	d.cmd.Wait()
	d.cmd = nil
}

// Restart restarts the daemon on the same socket. With connections, the
// processes serving its open connections are killed too (systemd's
// KillMode=control-group, `systemctl kill`); without, they go on serving
// them, as with the KillMode=process of Nix's own nix-daemon.service.
func (d *NixDaemon) Restart(t T, connections bool) {
	t.Helper()
	if connections {
		d.stop()
	} else {
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		d.cmd.Wait()
		d.cmd = nil
	}
	os.Remove(d.Socket)
	d.start(t)
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, child)
		}
	}
	return out
}

// ClientEnv is the environment of a Nix client of this daemon.
func (d *NixDaemon) ClientEnv(base []string) []string {
	return append(base, "NIX_REMOTE=daemon", "NIX_DAEMON_SOCKET_PATH="+d.Socket)
}

// AddTextPath adds a store path name-<unique> holding one file with text.
func AddTextPath(t T, name, text string) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), name+"-"+Unique())
	if err := os.WriteFile(src, []byte(text), 0o644); err != nil {
		t.Fatalf("%v", err)
	}
	return addToStore(t, src)
}

// AddRandomPath adds a store path named name-<unique> holding files of
// random bytes with the given sizes (a single file if there is one size),
// and deletes it at cleanup.
func AddRandomPath(t T, name string, sizes ...int) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), name+"-"+Unique())
	write := func(p string, n int) {
		data := make([]byte, n)
		rand.Read(data)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatalf("%v", err)
		}
	}
	if len(sizes) == 1 {
		write(src, sizes[0])
	} else {
		os.MkdirAll(src, 0o755)
		for i, n := range sizes {
			write(filepath.Join(src, fmt.Sprintf("part-%d", i)), n)
		}
	}
	p := addToStore(t, src)
	os.RemoveAll(src)
	t.Cleanup(func() { Output(NixEnv(""), "nix-store", "--delete", p) })
	return p
}

func addToStore(t T, src string) string {
	t.Helper()
	return strings.TrimSpace(Run(t, NixEnv(""), "nix-store", "--add", src))
}
