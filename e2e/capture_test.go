package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/internal/storewatch"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
)

// captureFlags start the store watcher at the store's top: the shared
// store's earlier paths are not this test's business.
func captureFlags(mode string) []string {
	return []string{"--capture", mode, "--capture-existing=false", "--capture-interval", "200ms"}
}

// hasNarinfo reports whether bucket holds p's narinfo.
func hasNarinfo(t *testing.T, m *testenv.MinIO, bucket, p string) bool {
	t.Helper()
	hash := strings.TrimPrefix(p, "/nix/store/")[:32]
	_, err := m.Client().StatObject(context.Background(), bucket, hash+".narinfo", minio.StatObjectOptions{})
	if err != nil && minio.ToErrorResponse(err).Code != "NoSuchKey" {
		t.Fatalf("stat %s.narinfo: %v", hash, err)
	}
	return err == nil
}

// nixLast is the id of the last path registered in the real store.
func nixLast(t *testing.T) int64 {
	t.Helper()
	d, err := storewatch.Open(storewatch.DefaultDir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	last, err := d.Last(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return last
}

// waitCursor waits until a's watcher has read Nix's database up to id.
func waitCursor(t *testing.T, a *Agent, id int64) protocol.Status {
	t.Helper()
	var s protocol.Status
	testenv.Poll(t, time.Minute, fmt.Sprintf("the store watcher to read up to row %d", id), func() bool {
		s = a.Status()
		if s.Capture != nil && s.Capture.Error != "" {
			t.Fatalf("store watcher: %s", s.Capture.Error)
		}
		return s.Capture != nil && s.Capture.Cursor >= id
	})
	return s
}

// TestCaptureAddedSources: a file added with nix-store --add and a source
// a nix-instantiate evaluation copies in (builtins.path) are uploaded by
// an agentd with --capture local, and not by one in the default mode (the
// hook's paths only), which runs alongside.
func TestCaptureAddedSources(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	hookBucket := "hookonly-" + testenv.Unique()
	m.MakeBucket(hookBucket)
	sk, pk := keyPair(t, "e2e-capture-1")
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	local := newAgent(t, m.CacheURL(""), sk, m.Env(), append(captureFlags("local"), "--metrics-listen", metricsAddr)...)
	local.Start()
	hookOnly := newAgent(t, m.BucketURL(hookBucket, ""), sk, m.Env(), "--capture-interval", "200ms")
	hookOnly.Start()
	if s := hookOnly.Status(); s.Capture != nil {
		t.Fatalf("default mode: capture status %+v, want none", s.Capture)
	}

	dir := t.TempDir()
	nonce := testenv.Unique()
	file := filepath.Join(dir, "added-"+nonce+".txt")
	os.WriteFile(file, []byte("added "+nonce+"\n"), 0o644)
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	os.WriteFile(filepath.Join(src, "main.c"), []byte("int main(){return 0;} /* "+nonce+" */\n"), 0o644)
	env := testenv.NixEnv("")
	added := strings.TrimSpace(testenv.Run(t, env, "nix-store", "--add", file))
	expr := filepath.Join(dir, "src.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`derivation {
  name = "uses-src-%s"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "cp -r ${builtins.path { path = %s; name = "src-%s"; }} $out" ];
}`, nonce, src, nonce)), 0o644)
	testenv.Run(t, env, "nix-instantiate", expr)
	source := strings.TrimSpace(testenv.Run(t, env, "nix-instantiate", "--eval", "--read-write-mode", "-E",
		fmt.Sprintf(`builtins.toString (builtins.path { path = %s; name = "src-%s"; })`, src, nonce)))
	source = strings.Trim(source, `"`)
	last := nixLast(t)

	waitCursor(t, local, last)
	s := local.WaitDrained(2 * time.Minute)
	if s.Failed != 0 {
		t.Fatalf("status %+v: failed jobs", s)
	}
	for _, p := range []string{added, source} {
		if !hasNarinfo(t, m, m.Bucket, p) {
			t.Errorf("--capture local: %s not uploaded", p)
		}
		verifyCache(t, m.HTTPURL(), pk, p)
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `nixspool_queued_paths_total{source="capture"}`) {
		t.Errorf("metrics lack the captured paths:\n%s", body)
	}
	// The other agent had as long; its mode leaves the paths out.
	hookOnly.WaitDrained(time.Minute)
	for _, p := range []string{added, source} {
		if hasNarinfo(t, m, hookBucket, p) {
			t.Errorf("default mode (hook): %s uploaded", p)
		}
	}
}

// TestCaptureBuiltWhileAgentDown: paths built while agentd was stopped and
// no hook configured are uploaded at its next start; a restart after that
// queues nothing again.
func TestCaptureBuiltWhileAgentDown(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-capture-2")
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), captureFlags("local")...)
	a.Start()
	waitCursor(t, a, 0)
	a.Stop()

	g := testenv.WriteGraph(t, t.TempDir(), false)
	top := build(t, testenv.NixEnv(""), g) // no hook
	last := nixLast(t)

	a.Start()
	waitCursor(t, a, last)
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 {
		t.Fatalf("status %+v: failed jobs", s)
	}
	verifyCache(t, m.HTTPURL(), pk, top)
	for _, p := range testenv.Requisites(t, testenv.NixEnv(""), top) {
		if !hasNarinfo(t, m, m.Bucket, p) {
			t.Errorf("%s not uploaded", p)
		}
	}
	cursor := s.Capture.Cursor
	uploaded := s.Uploaded
	a.Stop()

	// Restart: the cursor is where it was; only paths other processes
	// registered meanwhile may be captured.
	a.Start()
	now := nixLast(t)
	s = waitCursor(t, a, now)
	if strings.Count(a.log.String(), "store watcher starts") != 1 {
		t.Fatalf("the restart did not resume at the stored cursor:\n%s", a.log.String())
	}
	if extra := localRowsBetween(t, cursor, s.Capture.Cursor); s.Capture.Captured > uint64(extra) {
		t.Fatalf("restart handed %d paths to the queue; only %d local paths were registered since the cursor", s.Capture.Captured, extra)
	} else if extra == 0 {
		if s = a.WaitDrained(time.Minute); s.Uploaded != uploaded {
			t.Fatalf("restart uploaded %d more jobs", s.Uploaded-uploaded)
		}
	}
}

// localRowsBetween counts the local, non-derivation paths registered in
// (from, to].
func localRowsBetween(t *testing.T, from, to int64) int {
	t.Helper()
	d, err := storewatch.Open(storewatch.DefaultDir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	b, err := d.Read(context.Background(), from, 100000)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, p := range b.Paths {
		if p.ID <= to && p.Local() && !strings.HasSuffix(p.Path, ".drv") {
			n++
		}
	}
	return n
}

// TestCaptureSubstitutedFromUpstream: a path substituted from an upstream
// file:// cache, signed by the upstream's key, is uploaded by --capture
// all, and left out by --capture all --skip-signed-by that key.
func TestCaptureSubstitutedFromUpstream(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	skipBucket := "skip-" + testenv.Unique()
	m.MakeBucket(skipBucket)
	upSK, upPK := keyPair(t, "e2e-upstream-1")
	sk, pk := keyPair(t, "e2e-capture-3")
	env := testenv.NixEnv("")

	// The upstream cache holds a path this store then loses.
	nonce := testenv.Unique()
	expr := filepath.Join(t.TempDir(), "up.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`derivation { name = "upstream-%s"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo %s > $out" ]; }`, nonce, nonce)), 0o644)
	p := strings.TrimSpace(testenv.Run(t, env, "nix-build", expr, "--no-out-link"))
	upstream := "file://" + filepath.Join(t.TempDir(), "upstream")
	testenv.Run(t, env, "nix", "copy", "--to", upstream+"?secret-key="+upSK, p)
	testenv.Run(t, env, "nix-store", "--delete", p)

	all := newAgent(t, m.CacheURL(""), sk, m.Env(), append(captureFlags("all"), "--skip-signed-by", "")...)
	all.AuditUpstream = upstream
	all.Start()
	skip := newAgent(t, m.BucketURL(skipBucket, ""), sk, m.Env(), append(captureFlags("all"), "--skip-signed-by", "e2e-upstream-1")...)
	skip.Start()
	waitCursor(t, all, 0)
	waitCursor(t, skip, 0)

	testenv.Run(t, env, "nix-store", "--realise", p, "--option", "substituters", upstream, "--option", "trusted-public-keys", upPK)
	last := nixLast(t)

	waitCursor(t, all, last)
	if s := all.WaitDrained(2 * time.Minute); s.Failed != 0 {
		t.Fatalf("status %+v: failed jobs", s)
	}
	if !hasNarinfo(t, m, m.Bucket, p) {
		t.Fatalf("--capture all: substituted %s not uploaded", p)
	}
	verifyCache(t, m.HTTPURL(), pk, p)

	waitCursor(t, skip, last)
	skip.WaitDrained(time.Minute)
	if hasNarinfo(t, m, skipBucket, p) {
		t.Fatalf("--skip-signed-by e2e-upstream-1: %s uploaded", p)
	}
}

// TestPushBuildClosure: agentctl push --build-closure of a build's output
// puts what the build needed in the bucket: its derivations, its source,
// and the outputs of its inputs that are in the store; an input output
// that is not (collected since) is skipped with a reason. Every path of
// the input closure that existed locally substitutes into a fresh store
// from the bucket alone, signature checked.
func TestPushBuildClosure(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-buildclosure-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env())
	a.Start()

	dir := t.TempDir()
	nonce := testenv.Unique()
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	os.WriteFile(filepath.Join(src, "input.txt"), []byte("source "+nonce+"\n"), 0o644)
	expr := filepath.Join(dir, "bc.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  tool = mk "tool-%[1]s" "echo tool %[1]s > $out";
  gone = mk "gone-%[1]s" "echo gone %[1]s > $out";
  src = builtins.path { path = %[2]s; name = "src-%[1]s"; };
in mk "app-%[1]s" "read x < ${src}/input.txt; read y < ${tool}; read z < ${gone}; echo $x $y $z > $out"
`, nonce, src)), 0o644)
	env := testenv.NixEnv("")
	app := strings.TrimSpace(testenv.Run(t, env, "nix-build", expr, "--no-out-link")) // no hook
	drv := strings.TrimSpace(testenv.Run(t, env, "nix-store", "--query", "--deriver", app))
	inputs := strings.Fields(testenv.Run(t, env, "nix-store", "--query", "--requisites", drv))
	var gone string
	for _, p := range inputs {
		if strings.HasSuffix(p, "-gone-"+nonce+".drv") {
			gone = strings.TrimSpace(testenv.Run(t, env, "nix-store", "--query", "--outputs", p))
		}
	}
	testenv.Run(t, env, "nix-store", "--delete", gone)

	out, err := a.Ctl("push", "--build-closure", app)
	if err != nil {
		t.Fatalf("agentctl push --build-closure: %v\n%s", err, out)
	}
	if !strings.Contains(out, "skipped "+gone+": not in the store") {
		t.Errorf("push output does not name the missing input %s:\n%s", gone, out)
	}
	if s := a.WaitDrained(2 * time.Minute); s.Failed != 0 {
		t.Fatalf("status %+v: failed jobs", s)
	}

	// The input closure as it exists here: the derivations, the source,
	// and every output of those derivations still in the store.
	want := append([]string{}, inputs...)
	for _, p := range inputs {
		if !strings.HasSuffix(p, ".drv") {
			continue
		}
		for _, o := range strings.Fields(testenv.Run(t, env, "nix-store", "--query", "--outputs", p)) {
			if _, err := os.Lstat(o); err == nil {
				want = append(want, o)
			}
		}
	}
	var sawSrc, sawTool bool
	for _, p := range want {
		sawSrc = sawSrc || strings.HasSuffix(p, "-src-"+nonce)
		sawTool = sawTool || strings.HasSuffix(p, "-tool-"+nonce)
		if p == gone {
			t.Fatalf("%s was deleted but is listed", gone)
		}
	}
	if !sawSrc || !sawTool {
		t.Fatalf("input closure lacks the source or the tool: %v", want)
	}
	fresh := filepath.Join(t.TempDir(), "fresh")
	var drvs, outs []string
	for _, p := range want {
		if strings.HasSuffix(p, ".drv") {
			drvs = append(drvs, p)
		} else {
			outs = append(outs, p)
		}
	}
	copyArgs := []string{"copy", "--from", m.HTTPURL(), "--to", fresh, "--trusted-public-keys", pk}
	testenv.Run(t, env, "nix", append(copyArgs, outs...)...)
	testenv.Run(t, env, "nix", append(append(copyArgs, "--derivation"), drvs...)...)
	for _, p := range want {
		if _, err := os.Lstat(filepath.Join(fresh, p)); err != nil {
			t.Errorf("%s did not substitute from the bucket", p)
		}
	}
	if hasNarinfo(t, m, m.Bucket, gone) {
		t.Errorf("%s is in the bucket", gone)
	}
}

// TestHookBuildClosures: with --build-closures, a build the hook hands over
// also brings what it needed (its source, its input's derivation and
// output) into the bucket, and the hook's own output is there as ever.
func TestHookBuildClosures(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-buildclosure-2")
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--build-closures")
	a.Start()
	dir := t.TempDir()
	nonce := testenv.Unique()
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	os.WriteFile(filepath.Join(src, "input.txt"), []byte("source "+nonce+"\n"), 0o644)
	expr := filepath.Join(dir, "hb.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  tool = mk "tool-%[1]s" "echo tool %[1]s > $out";
  src = builtins.path { path = %[2]s; name = "src-%[1]s"; };
in mk "app-%[1]s" "read x < ${src}/input.txt; read y < ${tool}; echo $x $y > $out"
`, nonce, src)), 0o644)
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	app := strings.TrimSpace(testenv.Run(t, env, "nix-build", expr, "--no-out-link"))
	drv := strings.TrimSpace(testenv.Run(t, env, "nix-store", "--query", "--deriver", app))
	var needed []string
	for _, p := range strings.Fields(testenv.Run(t, env, "nix-store", "--query", "--requisites", drv)) {
		if strings.HasSuffix(p, "-src-"+nonce) || strings.HasSuffix(p, "-tool-"+nonce+".drv") {
			needed = append(needed, p)
		}
		if strings.HasSuffix(p, "-tool-"+nonce+".drv") {
			needed = append(needed, strings.TrimSpace(testenv.Run(t, env, "nix-store", "--query", "--outputs", p)))
		}
	}
	if len(needed) != 3 {
		t.Fatalf("input closure of %s: found %v, want the source, the tool's derivation and output", drv, needed)
	}
	testenv.Poll(t, time.Minute, "the build closure in the bucket", func() bool {
		for _, p := range needed {
			if !hasNarinfo(t, m, m.Bucket, p) {
				return false
			}
		}
		return true
	})
	if s := a.WaitDrained(time.Minute); s.Failed != 0 {
		t.Fatalf("status %+v: failed jobs", s)
	}
	verifyCache(t, m.HTTPURL(), pk, app)
}
