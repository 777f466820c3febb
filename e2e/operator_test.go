package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nixspool/nixspool/internal/testenv"
)

// TestOperatorView drives a real agentd and checks what operators see:
// status numbers, wait, doctor, push --closure and the metrics endpoint;
// and that neither secret it runs with (the S3 secret key, the signing
// key) shows in any of it, in its log or in any process's argv.
func TestOperatorView(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-ops-1")
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--metrics-listen", metricsAddr)
	a.Start()

	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), testenv.WriteGraph(t, t.TempDir(), false))
	// wait returns only once everything queued is in the bucket: stock Nix
	// must find the closure right after it.
	if out, err := a.Ctl("wait", "--timeout", "2m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	verifyCache(t, m.HTTPURL(), pk, top)
	s := a.Status()
	if s.Uploaded != testenv.GraphPaths || s.UploadedPaths != testenv.GraphPaths || s.Pending+s.Uploading+s.Retrying+s.Failed != 0 {
		t.Fatalf("status after wait = %+v", s)
	}
	if s.RatePathsPerSecond <= 0 || s.UploadedNARBytes == 0 || s.Cache == "" || s.CacheReachable == nil || !*s.CacheReachable {
		t.Fatalf("status lacks rate, totals or reachability: %+v", s)
	}
	human, _ := a.Ctl("status")
	if s.TimeToCache.Paths != testenv.GraphPaths || s.TimeToCache.P50Seconds <= 0 || s.TimeToCache.P99Seconds < s.TimeToCache.P50Seconds {
		t.Fatalf("status time to cache = %+v, want the %d jobs", s.TimeToCache, testenv.GraphPaths)
	}
	for _, want := range []string{"queue", "0 pending", "uploaded", "rate (1 min)", "(reachable)", "time to cache", "paths, last 15 min)"} {
		if !strings.Contains(human, want) {
			t.Errorf("human status lacks %q:\n%s", want, human)
		}
	}

	out, err := a.Ctl("doctor")
	if err != nil || !strings.Contains(out, "trusted-public-keys = "+pk) || !strings.Contains(out, "put, head and delete") || !strings.Contains(out, "environment (AWS_ACCESS_KEY_ID)") {
		t.Fatalf("doctor against a good MinIO: %v\n%s", err, out)
	}

	// push --closure: a path the hook never saw, with its dependencies.
	extra := testenv.AddTextPath(t, "closure", top) // mentions top, but --add records no references
	if out, err := a.Ctl("push", "--closure", extra, top); err != nil || !strings.Contains(out, "queued") {
		t.Fatalf("push --closure: %v\n%s", err, out)
	}
	if out, err := a.Ctl("wait", "--timeout", "1m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	verifyCache(t, m.HTTPURL(), pk, extra)

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// Neither the S3 secret key nor the signing key shows anywhere.
	assertNoSecrets(t, a, m.SecretKey, signingSecret(t, sk))
	if strings.Contains(string(body), m.SecretKey) || strings.Contains(string(body), signingSecret(t, sk)) {
		t.Error("the metrics show a secret")
	}
	for _, want := range []string{
		"nixspool_jobs_pending 0",
		"nixspool_jobs_failed 0",
		fmt.Sprintf(`nixspool_uploads_total{result="uploaded"} %d`, testenv.GraphPaths+1+testenv.GraphPaths),
		"nixspool_enqueue_duration_seconds_count",
		fmt.Sprintf("nixspool_time_to_cache_seconds_count %d", testenv.GraphPaths+1+testenv.GraphPaths),
		"nixspool_upload_duration_seconds_bucket",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestRoleProfileCredentials: agentd with profile= naming a role profile
// (role_arn with source_profile) gets session credentials from the
// store's STS (MinIO's AssumeRole, as AWS_ENDPOINT_URL_STS says), uploads
// with them, and doctor names the role and the source profile, never the
// source profile's secret.
func TestRoleProfileCredentials(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-role-1")
	dir := t.TempDir()
	creds, config := filepath.Join(dir, "credentials"), filepath.Join(dir, "config")
	if err := os.WriteFile(creds, []byte(fmt.Sprintf("[base]\naws_access_key_id = %s\naws_secret_access_key = %s\n", m.AccessKey, m.SecretKey)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(config, []byte("[profile uploader]\nrole_arn = arn:aws:iam::123456789012:role/cache-writer\nsource_profile = base\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"AWS_SHARED_CREDENTIALS_FILE=" + creds, "AWS_CONFIG_FILE=" + config, "AWS_ENDPOINT_URL_STS=http://" + m.Endpoint, "AWS_EC2_METADATA_DISABLED=true"}
	a := newAgent(t, m.CacheURL("profile=uploader"), sk, env)
	a.Start()
	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), testenv.WriteGraph(t, t.TempDir(), false))
	if out, err := a.Ctl("wait", "--timeout", "2m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	verifyCache(t, m.HTTPURL(), pk, top)
	out, err := a.Ctl("doctor")
	want := "profile uploader (assume role arn:aws:iam::123456789012:role/cache-writer with profile base)"
	if err != nil || !strings.Contains(out, want) || !strings.Contains(out, "put, head and delete") {
		t.Fatalf("doctor does not name the role (%q): %v\n%s", want, err, out)
	}
	assertNoSecrets(t, a, m.SecretKey, signingSecret(t, sk))
}

// assertNoSecrets fails the test if any secret shows in agentd's log, in
// agentctl status (--json and not), doctor or watch, or in the argv of any
// process on the machine (/proc/*/cmdline), which every user can read.
func assertNoSecrets(t *testing.T, a *Agent, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if len(s) < 8 {
			t.Fatalf("secret %q is too short to look for", s)
		}
	}
	seen := map[string]string{"agentd's log": a.log.String()}
	for _, args := range [][]string{{"status", "--json"}, {"status"}, {"doctor"}} {
		out, err := a.Ctl(args...)
		if err != nil {
			t.Fatalf("agentctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		seen["agentctl "+strings.Join(args, " ")] = out
	}
	seen["agentctl watch"] = watchOutput(t, a)
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	sawAgentd := false
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil || len(b) == 0 {
			continue // gone, or a kernel thread
		}
		argv := strings.ReplaceAll(string(b), "\x00", " ")
		sawAgentd = sawAgentd || strings.Contains(argv, bin("agentd")) && strings.Contains(argv, a.StateDir)
		seen["argv of "+filepath.Base(filepath.Dir(f))+" ("+strings.Fields(argv)[0]+")"] = argv
	}
	if !sawAgentd {
		t.Fatalf("agentd's argv not among the %d processes read", len(procs))
	}
	for where, text := range seen {
		for i, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("secret %d shows in %s", i, where)
			}
		}
	}
}

// watchOutput runs agentctl watch (piped: a line per change) until it has
// printed a few lines, then interrupts it and returns what it printed.
func watchOutput(t *testing.T, a *Agent) string {
	t.Helper()
	cmd := exec.Command(bin("agentctl"), "--socket", a.Socket, "watch", "--interval", "100ms")
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	testenv.Poll(t, 20*time.Second, "agentctl watch to print", func() bool { return strings.Count(out.String(), "\n") >= 1 })
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("agentctl watch: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "pending") {
		t.Fatalf("agentctl watch printed no status:\n%s", out.String())
	}
	return out.String()
}

// signingSecret returns the secret part of a Nix signing key file.
func signingSecret(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	_, material, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	if !ok {
		t.Fatalf("%s is not a signing key", file)
	}
	return material
}

// TestWaitTimesOutAndDoctorFails: with MinIO down, wait gives up at its
// timeout with exit status 3; with wrong credentials doctor fails with a
// hint about credentials.
func TestWaitTimesOutAndDoctorFails(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, _ := keyPair(t, "e2e-wait-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env())
	a.Start()
	m.Stop()
	build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), testenv.WriteGraph(t, t.TempDir(), false))
	start := time.Now()
	out, err := a.Ctl("wait", "--timeout", "2s")
	var ee *exec.ExitError
	if !errorsAs(err, &ee) || ee.ExitCode() != 3 || !strings.Contains(out, "timed out") {
		t.Fatalf("wait with the cache down: %v\n%s", err, out)
	}
	if el := time.Since(start); el > 15*time.Second {
		t.Fatalf("wait --timeout 2s took %v", el)
	}
	m.Start()

	bad := newAgent(t, m.CacheURL(""), sk, []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=wrong"})
	bad.SkipAudit = true // it cannot read the bucket; the first agent audits it
	bad.Start()
	out, err = bad.Ctl("doctor")
	if err == nil || !strings.Contains(out, "FAIL") || !strings.Contains(out, "check the credentials") {
		t.Fatalf("doctor with wrong credentials: %v\n%s", err, out)
	}
	if strings.Contains(out, "wrong") {
		t.Fatalf("doctor printed the secret:\n%s", out)
	}
}

func errorsAs(err error, target **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError)
	if ok {
		*target = e
	}
	return ok
}

// openPTY returns a pseudo-terminal pair.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	var unlock int32
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), unix.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); e != 0 {
		t.Fatal(e)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	return m, s
}

// TestWatchOnTerminal runs agentctl watch on a pseudo-terminal while a
// large path uploads slowly, and checks for the in-place redraw, the
// progress bar and a clean exit on Ctrl-C (SIGINT).
func TestWatchOnTerminal(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	p.DelayPuts(5*time.Second, "/nar/")
	sk, _ := keyPair(t, "e2e-watch-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env())
	a.Start()
	path := testenv.AddRandomPath(t, "watched", 3<<20)
	if out, err := a.Ctl("push", path); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}

	master, slave := openPTY(t)
	defer master.Close()
	cmd := exec.Command(bin("agentctl"), "--socket", a.Socket, "watch", "--interval", "200ms")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	var screen lockedBuffer
	got := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			screen.Write(buf[:n])
			if strings.Contains(screen.String(), "100%") && strings.Contains(screen.String(), filepath.Base(path)) {
				select {
				case <-got:
				default:
					close(got)
				}
			}
			if err != nil {
				return
			}
		}
	}()
	select {
	case <-got:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("no progress bar on the terminal:\n%q", screen.String())
	}
	cmd.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("watch did not exit cleanly on Ctrl-C: %v", err)
		}
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		t.Fatal("watch ignored Ctrl-C")
	}
	out := screen.String()
	if !strings.Contains(out, "\x1b[H\x1b[2J") || !strings.Contains(out, "[########") {
		t.Fatalf("no in-place redraw or progress bar:\n%q", out)
	}
}

// TestFilters: paths signed by an upstream key and excluded names are not
// uploaded, count as present for the closure rule, are counted in status,
// and doctor warns about the consequence.
func TestFilters(t *testing.T) {
	testenv.RequireNix(t)
	sk, _ := keyPair(t, "e2e-filter-1")
	upstream, _ := keyPair(t, "upstream-cache-1")
	env := testenv.NixEnv("")
	top := build(t, env, testenv.WriteGraph(t, t.TempDir(), false)) // no hook: built before agentd knows
	var leaf1, leaf3, mid1 string
	for _, p := range testenv.Requisites(t, env, top) {
		switch {
		case strings.HasSuffix(p, "-leaf1"):
			leaf1 = p
		case strings.HasSuffix(p, "-leaf3"):
			leaf3 = p
		case strings.HasSuffix(p, "-mid1"):
			mid1 = p
		}
	}
	testenv.Run(t, env, "nix", "store", "sign", "--key-file", upstream, leaf1)
	// The upstream cache that serves what its key signed.
	upstreamCache := "file://" + filepath.Join(t.TempDir(), "upstream")
	testenv.Run(t, env, "nix", "copy", "--to", upstreamCache, leaf1)
	cacheDir := filepath.Join(t.TempDir(), "cache")
	// leaf3 is excluded but mid2 needs it; top is excluded and nothing
	// needs it.
	a := newAgent(t, "file://"+cacheDir, sk, nil, "--skip-signed-by", "upstream-cache-1", "--exclude", "^leaf3$", "--exclude", "^top$")
	a.AuditUpstream = upstreamCache
	a.Start()
	if out, err := a.Ctl("push", "--closure", top); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	if out, err := a.Ctl("wait", "--timeout", "1m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	has := func(p string) bool {
		_, err := os.Stat(filepath.Join(cacheDir, filepath.Base(p)[:32]+".narinfo"))
		return err == nil
	}
	if has(leaf1) || !has(leaf3) || !has(mid1) || has(top) {
		t.Fatalf("want leaf1 (upstream) and top (excluded, not needed) left out, leaf3 (excluded, but needed by mid2) and mid1 uploaded: leaf1 %v leaf3 %v mid1 %v top %v",
			has(leaf1), has(leaf3), has(mid1), has(top))
	}
	if s := a.Status(); s.Skipped < 2 || s.Failed != 0 {
		t.Fatalf("status = %+v, want the filtered paths counted as skipped", s)
	}
	// Without the upstream, the cache is knowingly incomplete: mid1 names
	// leaf1. The audit says so, and with the upstream it is complete (the
	// harness audits with it at the end).
	out, err := testenv.Output(testenv.NixEnv(""), bin("agentd"), "audit", "--cache", "file://"+cacheDir)
	if err == nil || !strings.Contains(out, "missing-reference") || !strings.Contains(out, filepath.Base(leaf1)[:32]) {
		t.Fatalf("audit without the upstream: err=%v\n%s", err, out)
	}
	out, _ = a.Ctl("doctor")
	if !strings.Contains(out, "WARN") || !strings.Contains(out, "upstream-cache-1") || !strings.Contains(out, "complete only for clients") || !strings.Contains(out, "uploaded anyway") {
		t.Fatalf("doctor does not explain the filters:\n%s", out)
	}
}

// TestPresenceSurvivesRestart: after a restart, paths known to be in the
// cache are not asked about again.
func TestPresenceSurvivesRestart(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	var heads atomic.Int64
	p.Decide = func(r *http.Request, n int) testenv.Fault {
		if r.Method == http.MethodHead && strings.HasSuffix(r.URL.Path, ".narinfo") {
			heads.Add(1)
		}
		return testenv.Pass
	}
	sk, _ := keyPair(t, "e2e-presence-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env())
	a.Start()
	top := build(t, testenv.NixEnv(""), testenv.WriteGraph(t, t.TempDir(), false))
	if out, err := a.Ctl("push", "--closure", top); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	if out, err := a.Ctl("wait", "--timeout", "1m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	a.Stop()
	a.Start()
	before := heads.Load()
	if out, err := a.Ctl("push", "--closure", top); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	if out, err := a.Ctl("wait", "--timeout", "1m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	if n := heads.Load() - before; n != 0 {
		t.Fatalf("%d narinfo HEADs after the restart for paths already known to be in the cache", n)
	}
	if !strings.Contains(a.log.String(), "presence cache loaded") {
		t.Fatal("presence cache not loaded at start")
	}
}
