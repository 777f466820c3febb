package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
)

// writeDrv writes a Nix expression for a derivation name that depends on
// a derivation name-dep (so its output references dep's output), both
// unique to this call, and returns the file.
func writeDrv(t *testing.T, name string) string {
	t.Helper()
	return writeExpr(t, fmt.Sprintf(`mk %q [ (mk "%s-dep" [] "") ] ""`, name, name))
}

// nixBuild builds file with env and returns the top output path.
func nixBuild(t *testing.T, env []string, file string) string {
	t.Helper()
	return build(t, env, &testenv.Graph{File: file})
}

// narinfoOf returns the fields of p's narinfo in m's bucket, or nil if
// there is none.
func narinfoOf(t *testing.T, m *testenv.MinIO, p string) map[string]string {
	t.Helper()
	obj, err := m.Client().GetObject(context.Background(), m.Bucket, filepath.Base(p)[:32]+".narinfo", minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	data, err := io.ReadAll(obj)
	if err != nil {
		if minio.ToErrorResponse(err).Code == "NoSuchKey" {
			return nil
		}
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ": "); ok {
			fields[k] = v
		}
	}
	return fields
}

// setFlag sets a flag of the agent for its next start (the last value
// given wins).
func (a *Agent) setFlag(name, value string) {
	a.args = append(a.args, name, value)
}

// jobOf returns the id of p's job.
func (a *Agent) jobOf(p string) uint64 {
	a.t.Helper()
	out, err := a.Ctl("list", "--json")
	if err != nil {
		a.t.Fatalf("list: %v\n%s", err, out)
	}
	var jobs []protocol.Job
	if err := json.Unmarshal([]byte(out), &jobs); err != nil {
		a.t.Fatalf("list JSON: %v\n%s", err, out)
	}
	for _, j := range jobs {
		if j.Path == p {
			return j.ID
		}
	}
	a.t.Fatalf("no job for %s:\n%s", p, out)
	return 0
}

// TestFailedPathQueuedAgain (issue case 4): paths whose jobs failed
// because they vanished from the store before their upload are built (or
// pushed) again. The new request must bring the failed job back, so that
// the hook's acknowledgement means "will be uploaded": wait returns 0 and
// stock Nix substitutes the closures.
func TestFailedPathQueuedAgain(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-requeue-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env())
	a.Start()
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	nixEnv := testenv.NixEnv("")

	// The bucket is down while the paths are queued; meanwhile they are
	// collected.
	m.Stop()
	file := writeDrv(t, "requeue")
	top := nixBuild(t, env, file)
	text := "pushed " + testenv.Unique() + "\n"
	src := filepath.Join(t.TempDir(), "pushed")
	os.WriteFile(src, []byte(text), 0o644)
	pushed := strings.TrimSpace(testenv.Run(t, nixEnv, "nix-store", "--add", src))
	if out, err := a.Ctl("push", pushed); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Run(t, nixEnv, "nix-store", "--delete", top, pushed)
	m.Start()
	testenv.Poll(t, 2*time.Minute, "the collected paths' jobs to fail", func() bool {
		s := a.Status()
		return s.Failed == 2 && s.Pending+s.Uploading+s.Retrying == 0
	})
	failed, _ := a.Ctl("list", "--state", "failed")
	if !strings.Contains(failed, top) || !strings.Contains(failed, pushed) {
		t.Fatalf("failed jobs:\n%s", failed)
	}

	// Built and pushed again: same store paths.
	if again := nixBuild(t, env, file); again != top {
		t.Fatalf("rebuilt %s, want %s", again, top)
	}
	if again := strings.TrimSpace(testenv.Run(t, nixEnv, "nix-store", "--add", src)); again != pushed {
		t.Fatalf("added %s, want %s", again, pushed)
	}
	if out, err := a.Ctl("push", pushed); err != nil || !strings.Contains(out, "(job") {
		t.Fatalf("push again: %v\n%s", err, out)
	}
	if out, err := a.Ctl("wait", "--timeout", "2m"); err != nil {
		t.Fatalf("wait after the paths were built and pushed again: %v\n%s\n%s", err, out, failed)
	}
	if s := a.Status(); s.Failed != 0 {
		t.Fatalf("status = %+v", s)
	}
	verifyCache(t, m.HTTPURL(), pk, top)
	verifyCache(t, m.HTTPURL(), pk, pushed)
	if n := strings.Count(a.log.String(), "failed job queued again"); n != 2 {
		t.Errorf("%d \"failed job queued again\" log lines, want 2", n)
	}
}

// TestResumeWithOtherCompression (issue case 5): a large upload is
// interrupted by SIGKILL, and agentd restarts with another compression=.
// The kept zstd NAR must not be published under a narinfo that says
// "Compression: none": the resume record no longer matches, so it is
// discarded and the NAR uploaded again as configured. Stock Nix verifies
// and substitutes the path; the final audit checks Compression against the
// object.
func TestResumeWithOtherCompression(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	slow := p.DelayWhile(300*time.Millisecond, testenv.IsPart)
	sk, pk := keyPair(t, "e2e-recompress-1")
	zstdCache := m.CacheURLVia(p) + "&compression=zstd"
	a := newAgent(t, zstdCache, sk, m.Env())
	a.Start()

	const size = 80 << 20 // random bytes: 5 parts of 16 MiB
	path := testenv.AddRandomPath(t, "recompress", size)
	if out, err := a.Ctl("push", path); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Poll(t, time.Minute, "two parts to be uploaded", func() bool { return p.PartsDone.Load() >= 2 })
	a.Kill()
	testenv.Poll(t, 30*time.Second, "the killed agent's requests to end", func() bool { return p.InFlight.Load() == 0 })
	kept, _ := filepath.Glob(filepath.Join(a.StateDir, "tmp", "*.partial"))
	if len(kept) != 1 {
		t.Fatalf("kept files after the kill: %v, want the compressed NAR", kept)
	}

	slow.Store(false)
	a.setFlag("--cache", m.CacheURLVia(p)+"&compression=none")
	a.Start()
	s := a.WaitDrained(2 * time.Minute)
	if s.Uploaded != 1 || s.Failed != 0 {
		t.Fatalf("after the restart: %+v", s)
	}
	ni := narinfoOf(t, m, path)
	if ni["Compression"] != "none" || strings.HasSuffix(ni["URL"], ".zst") || ni["FileSize"] != ni["NarSize"] {
		t.Fatalf("narinfo after the restart with compression=none: %v", ni)
	}
	if !strings.Contains(a.log.String(), "cannot resume upload") || !strings.Contains(a.log.String(), "the cache wants") {
		t.Errorf("the mismatching resume record was not reported:\n%s", a.log.String())
	}
	if kept, _ := filepath.Glob(filepath.Join(a.StateDir, "tmp", "*.partial")); len(kept) != 0 {
		t.Errorf("kept files left: %v", kept)
	}
	verifyCache(t, m.HTTPURL(), pk, path)
}

// TestSpooledPathsAreRooted: with agentd down, the hook spools the outputs
// and roots them in agentd's GC roots directory, so the collector refuses
// to delete them; agentd imports the spool when it starts, uploads the
// paths and removes the roots.
func TestSpooledPathsAreRooted(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-spoolroot-1")
	roots := filepath.Join("/nix/var/nix/gcroots", "nixspool-test-"+testenv.Unique())
	t.Cleanup(func() { os.RemoveAll(roots) })
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--gc-roots", roots)
	// agentd is not running.
	var hookOut strings.Builder
	build := exec.Command("nix-build", writeDrv(t, "spoolroot"), "--no-out-link")
	build.Env = testenv.NixEnv(hookConfig(), append(a.HookEnv(), "NIXSPOOL_TIMEOUT=300ms")...)
	build.Stderr = &hookOut
	out, err := build.Output()
	if err != nil {
		t.Fatalf("nix-build with agentd down: %v\n%s", err, hookOut.String())
	}
	top := strings.TrimSpace(string(out))
	if !strings.Contains(hookOut.String(), "spooled to") {
		t.Fatalf("the hook did not spool:\n%s", hookOut.String())
	}
	files, _ := filepath.Glob(filepath.Join(a.StateDir, "spool", "*.json"))
	dep := strings.TrimSpace(testenv.Run(t, testenv.NixEnv(""), "nix-store", "-q", "--references", top))
	if len(files) != 2 { // one per build: dep, then top
		t.Fatalf("spool files = %v", files)
	}
	for _, p := range []string{top, dep} {
		if got, err := os.Readlink(filepath.Join(roots, filepath.Base(p))); err != nil || got != p {
			t.Fatalf("no GC root for the spooled path %s: %q, %v", p, got, err)
		}
	}
	// The collector, restricted to this path, must refuse.
	if out, err := testenv.Output(testenv.NixEnv(""), "nix-store", "--delete", top); err == nil || !strings.Contains(out, "alive") {
		t.Fatalf("nix-store --delete of a spooled path: err=%v\n%s", err, out)
	}

	a.Start()
	if out, err := a.Ctl("wait", "--timeout", "2m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	if s := a.Status(); s.Uploaded != 2 || s.Spooled.Files != 0 {
		t.Fatalf("status = %+v", s)
	}
	verifyCache(t, m.HTTPURL(), pk, top)
	testenv.Poll(t, 30*time.Second, "the roots to be removed after the upload", func() bool {
		ents, _ := os.ReadDir(roots)
		return len(ents) == 0
	})
}

// TestDropDuringUpload: dropping a job while its NAR is being uploaded
// stops the upload: no narinfo is written, no error shows in status (the
// acknowledgement of an upload that went on used to report a bogus
// state_dir_error), and a large upload's kept compressed NAR and multipart
// upload are discarded only once the worker has stopped using them (the
// drop used to remove them under the running upload). Pushed again, the
// paths upload normally.
func TestDropDuringUpload(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	p := testenv.StartFaultProxy(t, m.Endpoint)
	slow := p.DelayWhile(3*time.Second, testenv.IsNARPut)
	sk, pk := keyPair(t, "e2e-drop-1")
	a := newAgent(t, m.CacheURLVia(p), sk, m.Env())
	a.Start()
	// One NAR sent in a single PUT, one large enough for a resumable
	// multipart upload (80 MiB: 5 parts).
	paths := []string{testenv.AddRandomPath(t, "dropped-single", 8<<20), testenv.AddRandomPath(t, "dropped-multipart", 80<<20)}
	for i, path := range paths {
		delays := p.Count(testenv.Delay)
		if out, err := a.Ctl("push", path); err != nil {
			t.Fatalf("push: %v\n%s", err, out)
		}
		testenv.Poll(t, time.Minute, "the NAR's upload to start", func() bool { return p.Count(testenv.Delay) > delays })
		id := a.jobOf(path)
		if out, err := a.Ctl("drop", strconv.FormatUint(id, 10)); err != nil || !strings.Contains(out, "dropped job") {
			t.Fatalf("drop: %v\n%s", err, out)
		}
		testenv.Poll(t, time.Minute, "the worker to finish with the dropped job", func() bool {
			l := a.log.String()
			return strings.Count(l, "upload of a dropped job stopped") > i || strings.Contains(l, "job done") || strings.Contains(l, "upload failed")
		})
		s := a.Status()
		if s.StateDirError != "" || s.Pending+s.Uploading+s.Retrying+s.Failed != 0 {
			t.Fatalf("status after dropping the upload of %s: %+v", path, s)
		}
		if ni := narinfoOf(t, m, path); ni != nil {
			t.Fatalf("the dropped job's upload went on to write its narinfo: %v", ni)
		}
		if l := a.log.String(); strings.Contains(l, "job done") || strings.Contains(l, "upload failed") || strings.Contains(l, "not leased") {
			t.Fatalf("the dropped job's upload was not stopped quietly:\n%s", l)
		}
	}
	testenv.Poll(t, 30*time.Second, "the kept NAR to be removed", func() bool {
		kept, _ := filepath.Glob(filepath.Join(a.StateDir, "tmp", "*.partial"))
		return len(kept) == 0
	})

	slow.Store(false)
	if out, err := a.Ctl(append([]string{"push"}, paths...)...); err != nil {
		t.Fatalf("push again: %v\n%s", err, out)
	}
	if out, err := a.Ctl("wait", "--timeout", "2m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	if s := a.Status(); s.StateDirError != "" || s.Uploaded != 2 {
		t.Fatalf("status after the second push: %+v", s)
	}
	for _, path := range paths {
		verifyCache(t, m.HTTPURL(), pk, path)
	}
}

// TestWaitCountsSpool: requests a hook spooled because it could not reach
// agentd are not jobs until the next spool import; status shows them and
// agentctl wait waits for them (it used to return 0 at once).
func TestWaitCountsSpool(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-waitspool-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--spool-interval", "1h")
	a.Start()
	// A hook that cannot reach agentd (say it timed out) spools into
	// agentd's state directory.
	lost := testenv.NixEnv(hookConfig(), "NIXSPOOL_SOCKET="+filepath.Join(t.TempDir(), "none.sock"),
		"NIXSPOOL_STATE_DIR="+a.StateDir, "NIXSPOOL_GC_ROOTS=off")
	first := nixBuild(t, lost, writeDrv(t, "waitspool"))
	s := a.Status()
	if s.Spooled.Files != 2 || s.Spooled.Paths != 2 || s.Spooled.OldestAt == 0 {
		t.Fatalf("status.spooled = %+v, want the 2 spooled requests", s.Spooled)
	}
	if human, _ := a.Ctl("status"); !strings.Contains(human, "spooled") {
		t.Errorf("status view does not show the spool:\n%s", human)
	}
	out, err := a.Ctl("wait", "--timeout", "2s")
	var ee *exec.ExitError
	if !errorsAs(err, &ee) || ee.ExitCode() != 3 || !strings.Contains(out, "spooled") {
		t.Fatalf("wait with spooled requests not imported (spool interval 1h): %v\n%s", err, out)
	}

	// With imports every second, wait returns once the spooled paths are
	// in the bucket.
	a.Stop()
	a.setFlag("--spool-interval", "1s")
	a.Start() // imports the first build's requests
	second := nixBuild(t, lost, writeDrv(t, "waitspool"))
	if out, err := a.Ctl("wait", "--timeout", "2m"); err != nil {
		t.Fatalf("wait: %v\n%s", err, out)
	}
	for _, p := range []string{first, second} {
		if narinfoOf(t, m, p) == nil {
			t.Fatalf("wait returned 0 before %s was uploaded", p)
		}
	}
	verifyCache(t, m.HTTPURL(), pk, second)
}
