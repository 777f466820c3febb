package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/storepath"
)

// TestSingleUserToMinIO: root runs nix-build without a daemon, the hook
// queues every output, agentd uploads to MinIO, and stock Nix verifies and
// substitutes the whole closure over HTTP.
func TestSingleUserToMinIO(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-s3-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env())
	a.Start()

	g := testenv.WriteGraph(t, t.TempDir(), true)
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	top := build(t, env, g)

	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 || s.Uploaded != testenv.GraphPaths {
		t.Fatalf("status = %+v, want %d uploaded and none failed", s, testenv.GraphPaths)
	}
	if s.UploadedNARBytes < 2<<20 {
		t.Errorf("uploaded_nar_bytes = %d, want the two 1 MiB blobs counted", s.UploadedNARBytes)
	}
	keys := strings.Join(m.Keys(t), "\n")
	for _, want := range []string{"nix-cache-info", ".nar.zst"} {
		if !strings.Contains(keys, want) {
			t.Errorf("bucket lacks %s:\n%s", want, keys)
		}
	}
	verifyCache(t, m.HTTPURL(), pk, top)

	// The same check with a key the cache was not signed with must fail:
	// proof that the check above really checked signatures.
	_, otherPK := keyPair(t, "e2e-other-1")
	out, err := testenv.Output(testenv.NixEnv(""), "nix", "store", "verify", "--store", m.HTTPURL(), "--trusted-public-keys", otherPK, "-r", top)
	if err == nil || !strings.Contains(out, "untrusted") {
		t.Fatalf("verify with an unknown key passed (err=%v):\n%s", err, out)
	}
}

// TestMultiUserToFileCache runs builds through a nix-daemon on a private
// socket with the hook in the daemon's configuration, as on NixOS, and
// agentd reading metadata through that daemon; the cache is file://.
func TestMultiUserToFileCache(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-file-1")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	// The agent is created first so the daemon's hook knows its socket.
	a := newAgent(t, "file://"+cacheDir+"?write-nar-listing=1", sk, nil, "--upload-build-logs")
	daemon := testenv.StartNixDaemon(t, testenv.NixEnv(hookConfig(), a.HookEnv()...))
	a.args = append(a.args, "--nix-daemon-socket", daemon.Socket)
	a.Start()
	if !strings.Contains(a.log.String(), "daemon socket "+daemon.Socket) {
		t.Fatalf("agentd does not use the daemon:\n%s", a.log.String())
	}

	g := testenv.WriteGraph(t, t.TempDir(), false)
	top := build(t, daemon.ClientEnv(testenv.NixEnv("")), g)
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 || s.Uploaded != testenv.GraphPaths {
		t.Fatalf("status = %+v, want %d uploaded", s, testenv.GraphPaths)
	}
	if _, err := os.Stat(filepath.Join(cacheDir, storepath.HashPart(top)+".ls")); err != nil {
		t.Errorf("write-nar-listing=1 wrote no listing: %v", err)
	}
	verifyCache(t, "file://"+cacheDir, pk, top)
	// The build log went up too, and stock Nix reads it from the cache.
	drv := strings.TrimSpace(testenv.Run(t, testenv.NixEnv(""), "nix-store", "-q", "--deriver", top))
	if out := testenv.Run(t, testenv.NixEnv(""), "nix-store", "--store", "file://"+cacheDir, "--read-log", drv); !strings.Contains(out, "building top") {
		t.Fatalf("nix log from the cache: %q", out)
	}
}

// TestSpoolWhileAgentDown: with agentd stopped the build still succeeds and
// the hook spools; when agentd starts it imports the spool and uploads.
func TestSpoolWhileAgentDown(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-spool-1")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	a := newAgent(t, "file://"+cacheDir, sk, nil)
	g := testenv.WriteGraph(t, t.TempDir(), false)
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	out, err := testenv.Output(env, "nix-build", g.File, "--no-out-link")
	if err != nil {
		t.Fatalf("nix-build with agentd down: %v\n%s", err, out)
	}
	var top string
	for _, f := range strings.Fields(out) {
		if strings.HasPrefix(f, "/nix/store/") && strings.HasSuffix(f, "-top") {
			top = f
		}
	}
	if !strings.Contains(out, "spooled to") || top == "" {
		t.Fatalf("hook did not report spooling:\n%s", out)
	}
	files, err := spool.Files(filepath.Join(a.StateDir, "spool"))
	if err != nil || len(files) == 0 {
		t.Fatalf("spool holds %d files (%v), want one per built derivation", len(files), err)
	}
	a.Start()
	s := a.WaitDrained(2 * time.Minute)
	if s.Uploaded != testenv.GraphPaths || s.Failed != 0 {
		t.Fatalf("status after import = %+v", s)
	}
	if files, _ := spool.Files(filepath.Join(a.StateDir, "spool")); len(files) != 0 {
		t.Fatalf("spool still holds %v after import", files)
	}
	verifyCache(t, "file://"+cacheDir, pk, top)
}

// TestStrictHookFailsBuild: NIXSPOOL_STRICT=1 makes an unreachable agentd
// fail the build (opt-in).
func TestStrictHookFailsBuild(t *testing.T) {
	testenv.RequireNix(t)
	g := testenv.WriteGraph(t, t.TempDir(), false)
	dir := t.TempDir()
	env := testenv.NixEnv(hookConfig(), "NIXSPOOL_SOCKET="+dir+"/none.sock", "NIXSPOOL_STATE_DIR="+dir, "NIXSPOOL_STRICT=1", "NIXSPOOL_GC_ROOTS=off")
	if out, err := testenv.Output(env, "nix-build", g.File, "--no-out-link"); err == nil {
		t.Fatalf("strict hook with agentd down did not fail the build:\n%s", out)
	}
}

// TestRefusesBadInputAndKeepsServing sends hostile and malformed requests;
// each gets a clear error, and agentd keeps serving.
func TestRefusesBadInputAndKeepsServing(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-bad-1")
	a := newAgent(t, "file://"+filepath.Join(t.TempDir(), "cache"), sk, nil)
	a.Start()
	for path, want := range map[string]string{
		"/etc/shadow":                 "not a store path",
		"/nix/store/../../etc/shadow": "not a store path",
		"/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7q-gone": "not a valid path",
		"/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7q-x/..": "not a store path",
		"relative": "not a store path",
	} {
		out, err := a.Ctl("push", path)
		if err == nil || !strings.Contains(out, want) || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Errorf("push %q: err=%v, output %q; want one line mentioning %q", path, err, out, want)
		}
	}
	// Many bad paths at once (a bulk push takes another road: a presence
	// check in bulk before the jobs are queued).
	var many []string
	for i := 0; i < 100; i++ {
		many = append(many, fmt.Sprintf("/tmp/not-a-store-path-%d", i))
	}
	if out, err := a.Ctl(append([]string{"push"}, many...)...); err == nil || !strings.Contains(out, "not a store path") || strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Errorf("push of 100 bad paths: err=%v, output %q", err, out)
	}
	// Raw garbage on the socket.
	for msg, want := range map[string]string{
		"not json\n":                      "malformed request",
		"{\"v\":99,\"op\":\"status\"}\n":  "unsupported protocol version",
		"{\"v\":1,\"op\":\"launch\"}\n":   "unknown operation",
		"{\"v\":1,\"op\":\"status\"":      "truncated",
		strings.Repeat("x", 2<<20) + "\n": "maximum size",
	} {
		c, err := net.Dial("unix", a.Socket)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		go func() { c.Write([]byte(msg)); c.(*net.UnixConn).CloseWrite() }()
		reply, _ := io.ReadAll(c)
		c.Close()
		if !strings.Contains(string(reply), want) || !strings.Contains(string(reply), `"ok":false`) {
			t.Errorf("reply to %.40q = %q, want an error mentioning %q", msg, reply, want)
		}
	}
	if s := a.Status(); s.Pending != 0 || s.Failed != 0 {
		t.Fatalf("bad requests changed the queue: %+v", s)
	}
	if !strings.Contains(a.log.String(), "request refused") && !strings.Contains(a.log.String(), "enqueue refused") {
		t.Errorf("refusals were not logged:\n%s", a.log.String())
	}
}

// TestHashMismatchIsRefused: a store path whose contents no longer match
// the NarHash Nix recorded fails permanently and leaves no narinfo behind.
func TestHashMismatchIsRefused(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-hash-1")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	a := newAgent(t, "file://"+cacheDir, sk, nil)
	a.Start()
	env := testenv.NixEnv("")
	p := testenv.AddTextPath(t, "victim", "original contents\n")
	t.Cleanup(func() { testenv.Output(env, "nix-store", "--delete", p) })
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, []byte("tampered contents!\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	if out, err := a.Ctl("push", p); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	var s = a.Status()
	testenv.Poll(t, time.Minute, "the job to fail", func() bool { s = a.Status(); return s.Failed == 1 })
	if !strings.Contains(s.LastError, "does not match") {
		t.Errorf("last error = %q, want a hash mismatch naming both hashes", s.LastError)
	}
	if _, err := os.Stat(filepath.Join(cacheDir, storepath.HashPart(p)+".narinfo")); !os.IsNotExist(err) {
		t.Fatalf("a narinfo for the corrupt path exists (err=%v)", err)
	}
	out, _ := a.Ctl("list", "--state", "failed")
	if !strings.Contains(out, p) {
		t.Errorf("list --state failed does not show the path:\n%s", out)
	}
	// wait reports the failure with exit status 1.
	out, err := a.Ctl("wait", "--timeout", "30s")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, "failed: "+p) {
		t.Errorf("wait after a failure: %v\n%s", err, out)
	}
}

// TestDotDotNamesUpload: a path containing entries named "..data" and
// "..2024" (which go-nix's NAR writer rejects) uploads and verifies.
func TestDotDotNamesUpload(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-dots-1")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	a := newAgent(t, "file://"+cacheDir, sk, nil)
	a.Start()
	src := filepath.Join(t.TempDir(), "k8s-"+testenv.Unique())
	os.MkdirAll(filepath.Join(src, "..2024_01_01"), 0o755)
	os.WriteFile(filepath.Join(src, "..2024_01_01", "config"), []byte("x=1\n"), 0o644)
	os.Symlink("..2024_01_01", filepath.Join(src, "..data"))
	os.Symlink("..data/config", filepath.Join(src, "config"))
	env := testenv.NixEnv("")
	p := strings.TrimSpace(testenv.Run(t, env, "nix-store", "--add", src))
	if out, err := a.Ctl("push", p); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	if s := a.WaitDrained(time.Minute); s.Uploaded != 1 || s.Failed != 0 {
		t.Fatalf("status = %+v", s)
	}
	verifyCache(t, "file://"+cacheDir, pk, p)
}

// TestXZAndNoCompression: the other compressions stock Nix reads.
func TestXZAndNoCompression(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-xz-1")
	g := testenv.WriteGraph(t, t.TempDir(), false)
	top := build(t, testenv.NixEnv(""), g)
	for _, comp := range []string{"xz", "none"} {
		cacheDir := filepath.Join(t.TempDir(), "cache-"+comp)
		a := newAgent(t, "file://"+cacheDir+"?compression="+comp, sk, nil, "--skip-signed-by=")
		a.Start()
		if out, err := a.Ctl("push", "--closure", top); err != nil {
			t.Fatalf("push: %v\n%s", err, out)
		}
		if out, err := a.Ctl("wait", "--timeout", "1m"); err != nil {
			t.Fatalf("wait: %v\n%s", err, out)
		}
		ni, err := os.ReadFile(filepath.Join(cacheDir, storepath.HashPart(top)+".narinfo"))
		if err != nil || !strings.Contains(string(ni), "Compression: "+comp+"\n") {
			t.Fatalf("narinfo with compression=%s: %v\n%s", comp, err, ni)
		}
		verifyCache(t, "file://"+cacheDir, pk, top)
		a.Kill()
	}
}

// TestMemoryBound uploads a 384 MiB path and checks agentd's peak resident
// set from /proc: a bound, not a timing.
func TestMemoryBound(t *testing.T) {
	testenv.RequireNix(t)
	if os.Getenv("NIXSPOOL_RACE") == "1" {
		t.Skip("the race detector multiplies memory use")
	}
	m := testenv.StartMinIO(t)
	sk, _ := keyPair(t, "e2e-rss-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env())
	a.Start()
	const part = 64 << 20
	p := testenv.AddRandomPath(t, "rss", part, part, part, part, part, part)
	if out, err := a.Ctl("push", p); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	if s := a.WaitDrained(3 * time.Minute); s.Uploaded != 1 {
		t.Fatalf("status %+v", s)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", a.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	var hwm int
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%d", &hwm)
		}
	}
	if hwm == 0 || hwm > 200*1024 {
		t.Fatalf("agentd peak RSS %d KiB for a 384 MiB NAR, want at most 200 MiB", hwm)
	}
	t.Logf("peak RSS %d MiB for a 384 MiB NAR", hwm/1024)
}

// TestFloatingCAOutputs: a floating content-addressed derivation has no
// output path in its .drv (and Nix 2.8 leaves OUT_PATHS empty): the hook
// hands over the derivation and agentd finds the realised output.
func TestFloatingCAOutputs(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-ca-1")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	caConfig := "experimental-features = nix-command ca-derivations\n"
	a := newAgent(t, "file://"+cacheDir, sk, []string{"NIX_CONFIG=" + testenv.NixConfig + caConfig})
	a.Start()
	expr := filepath.Join(t.TempDir(), "ca.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`builtins.derivation {
  name = "ca-out"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "echo floating > $out" ];
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  nonce = "%s";
}`, testenv.Unique())), 0o644)
	env := testenv.NixEnv(hookConfig()+caConfig, a.HookEnv()...)
	out := strings.TrimSpace(testenv.Run(t, env, "nix-build", expr, "--no-out-link"))
	top := out[strings.LastIndex(out, "\n")+1:]
	if s := a.WaitDrained(time.Minute); s.Uploaded != 1 || s.Failed != 0 {
		t.Fatalf("status = %+v, want the floating output uploaded", s)
	}
	ni, err := os.ReadFile(filepath.Join(cacheDir, storepath.HashPart(top)+".narinfo"))
	if err != nil || !strings.Contains(string(ni), "CA: fixed:r:sha256:") {
		t.Fatalf("narinfo of the CA output: %v\n%s", err, ni)
	}
	verifyCache(t, "file://"+cacheDir, pk, top)
}

// TestNixDaemonRestartDoesNotSpool: a restart of the Nix daemon that also
// ends the processes serving its connections closes agentd's pooled
// connections to it; the next build's hook is still answered (the query
// is retried on a fresh connection) instead of spooling.
func TestNixDaemonRestartDoesNotSpool(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-restart-1")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	a := newAgent(t, "file://"+cacheDir, sk, nil, "--spool-interval", "1h")
	daemon := testenv.StartNixDaemon(t, testenv.NixEnv(hookConfig(), a.HookEnv()...))
	a.args = append(a.args, "--nix-daemon-socket", daemon.Socket)
	a.Start()
	client := daemon.ClientEnv(testenv.NixEnv(""))
	build(t, client, testenv.WriteGraph(t, t.TempDir(), false))
	a.WaitDrained(2 * time.Minute)

	daemon.Restart(t, true)
	top := build(t, client, testenv.WriteGraph(t, t.TempDir(), false))
	if files, _ := spool.Files(filepath.Join(a.StateDir, "spool")); len(files) != 0 {
		t.Fatalf("after a restart of the Nix daemon the hook spooled %d request(s)", len(files))
	}
	if s := a.WaitDrained(2 * time.Minute); s.Failed != 0 || s.Uploaded != 2*testenv.GraphPaths {
		t.Fatalf("status = %+v, want %d uploaded", s, 2*testenv.GraphPaths)
	}
	verifyCache(t, "file://"+cacheDir, pk, top)
}
