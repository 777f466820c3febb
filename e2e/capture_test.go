package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storewatch"
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
	local := newAgent(t, m.CacheURL(""), sk, m.Env(), captureFlags("local")...)
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
