package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/storepath"
)

// gcReport runs `agentctl gc --json` with args and returns the report; it
// fails the test unless the exit status is as wanted.
func gcReport(t *testing.T, a *Agent, wantOK bool, args ...string) (*cachegc.Report, string) {
	t.Helper()
	cmd := exec.Command(bin("agentctl"), append([]string{"--socket", a.Socket, "gc", "--json"}, args...)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if (err == nil) != wantOK {
		t.Fatalf("agentctl gc %v: %v (want ok=%v)\n%s%s", args, err, wantOK, stdout.String(), stderr.String())
	}
	var rep cachegc.Report
	if stdout.Len() > 0 {
		if err := json.Unmarshal([]byte(stdout.String()), &rep); err != nil {
			t.Fatalf("gc report: %v\n%s", err, stdout.String())
		}
	}
	return &rep, stderr.String()
}

// closureOf returns the local closure of p.
func closureOf(t *testing.T, p string) []string {
	t.Helper()
	return testenv.Requisites(t, testenv.NixEnv(""), p)
}

// inBucket reports which of paths have a narinfo in m's bucket.
func inBucket(t *testing.T, m *testenv.MinIO, paths []string) (have, lack []string) {
	t.Helper()
	c := m.Client()
	for _, p := range paths {
		_, err := c.StatObject(context.Background(), m.Bucket, storepath.HashPart(p)+".narinfo", minio.StatObjectOptions{})
		if err == nil {
			have = append(have, p)
		} else {
			lack = append(lack, p)
		}
	}
	return have, lack
}

// TestGCDryRunThenRun: closures older than --keep-since go, a pinned one
// and a recent one stay; a dry run deletes nothing and names exactly what
// the real run then deletes; stock Nix still substitutes what stays; a
// second collector is refused while the first holds the lease; unpinning
// lets the next cycle collect the pinned closure.
func TestGCDryRunThenRun(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-gc-1")
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--gc-poll-interval", "200ms", "--metrics-listen", metricsAddr, "--exclude", "^unpinnable$")
	a.Start()
	hookEnv := testenv.NixEnv(hookConfig(), a.HookEnv()...)

	old := build(t, hookEnv, testenv.WriteGraph(t, t.TempDir(), false))
	// Built without the hook: not in the cache until it is pinned, which
	// uploads it.
	pinned := build(t, testenv.NixEnv(""), testenv.WriteGraph(t, t.TempDir(), false))
	if out, err := a.Ctl("pin", "release-1", pinned); err != nil {
		t.Fatalf("pin: %v\n%s", err, out)
	}
	a.WaitDrained(2 * time.Minute)
	if have, _ := inBucket(t, m, closureOf(t, pinned)); len(have) != testenv.GraphPaths {
		t.Fatalf("pin uploaded %d of %d paths", len(have), testenv.GraphPaths)
	}
	// A path the filters keep out of the cache cannot be pinned.
	filtered := build(t, testenv.NixEnv(""), &testenv.Graph{File: writeExpr(t, `mk "unpinnable" [] ""`)})
	if out, err := a.Ctl("pin", "filtered", filtered); err == nil || !strings.Contains(out, "filters keep it out") {
		t.Fatalf("pin of a filtered path: %v\n%s", err, out)
	}
	if out, _ := a.Ctl("pins"); strings.Contains(out, "filtered") {
		t.Fatalf("a pin was written for a filtered path:\n%s", out)
	}
	const keepSince = 10 * time.Second
	aged := time.Now().Add(keepSince + 2*time.Second)
	for time.Now().Before(aged) { // the first two closures grow old
		time.Sleep(100 * time.Millisecond)
	}
	recent := build(t, hookEnv, testenv.WriteGraph(t, t.TempDir(), false))
	a.WaitDrained(2 * time.Minute)
	before := m.Keys(t)

	dry, _ := gcReport(t, a, true, "--keep-since", "10s", "--grace", "4s", "--dry-run")
	if after := m.Keys(t); !slices.Equal(before, after) {
		t.Fatalf("the dry run changed the bucket")
	}
	oldPaths := closureOf(t, old)
	slices.Sort(oldPaths)
	if !dry.DryRun || !slices.Equal(dry.Paths, oldPaths) {
		t.Fatalf("dry run would delete\n%v\nwant the old closure\n%v", dry.Paths, oldPaths)
	}
	out, err := a.Ctl("gc", "--keep-since", "10s", "--grace", "4s", "--dry-run")
	if err != nil || !strings.Contains(out, "would delete "+old) || !strings.Contains(out, "gc dry run: would delete 11 narinfos") {
		t.Fatalf("dry run output: %v\n%s", err, out)
	}

	// A second agent on the bucket may not collect while the first does.
	sk2, _ := keyPair(t, "e2e-gc-2")
	b := newAgent(t, m.CacheURL(""), sk2, m.Env(), "--gc-poll-interval", "200ms")
	b.SkipAudit = true
	b.Start()
	type result struct {
		rep    *cachegc.Report
		stderr string
	}
	done := make(chan result, 1)
	go func() {
		rep, stderr := gcReport(t, a, true, "--keep-since", "10s", "--grace", "4s")
		done <- result{rep, stderr}
	}()
	testenv.Poll(t, 30*time.Second, "the first collector to announce", func() bool {
		for _, k := range m.Keys(t) {
			if strings.HasPrefix(k, cachegc.AnnouncePrefix) {
				return true
			}
		}
		return false
	})
	if out, err := b.Ctl("gc", "--keep-since", "10s", "--grace", "4s"); err == nil || !strings.Contains(out, "holds the bucket's lease") {
		t.Fatalf("second collector: %v\n%s", err, out)
	}
	if out, err := a.Ctl("gc", "--keep-since", "10s", "--grace", "4s"); err == nil || !strings.Contains(out, "already running") {
		t.Fatalf("second cycle in the same agentd: %v\n%s", err, out)
	}
	res := <-done
	real := res.rep
	if len(real.Warnings)+len(dry.Warnings) > 0 {
		t.Errorf("warnings: %v %v", dry.Warnings, real.Warnings)
	}
	if !real.Complete || !slices.Equal(real.Keys, dry.Keys) || real.Deleted != dry.Doomed {
		t.Fatalf("the run deleted\n%v (%+v)\nthe dry run named\n%v (%+v)", real.Keys, real.Deleted, dry.Keys, dry.Doomed)
	}
	for _, stage := range []string{"gc: lease", "gc: grace", "gc: sweep", "gc: delete", "gc: done"} {
		if !strings.Contains(res.stderr, stage) {
			t.Errorf("progress lacks %q:\n%s", stage, res.stderr)
		}
	}
	if _, lack := inBucket(t, m, oldPaths); len(lack) != len(oldPaths) {
		t.Fatalf("%d of %d old paths left", len(oldPaths)-len(lack), len(oldPaths))
	}
	verifyCache(t, m.HTTPURL(), pk, pinned)
	verifyCache(t, m.HTTPURL(), pk, recent)

	out, err = a.Ctl("pins")
	if err != nil || !strings.Contains(out, "release-1") || !strings.Contains(out, pinned) {
		t.Fatalf("pins: %v\n%s", err, out)
	}
	if out, err := a.Ctl("unpin", "release-1"); err != nil || !strings.Contains(out, "unpinned release-1") {
		t.Fatalf("unpin: %v\n%s", err, out)
	}
	if out, err := a.Ctl("unpin", "release-1"); err == nil || !strings.Contains(out, "no such pin") {
		t.Fatalf("unpin twice: %v\n%s", err, out)
	}
	again, _ := gcReport(t, a, true, "--keep-since", "10s", "--grace", "4s")
	if again.Deleted.Narinfos != testenv.GraphPaths {
		t.Fatalf("after unpinning, the cycle deleted %d narinfos, want the %d of the pinned closure", again.Deleted.Narinfos, testenv.GraphPaths)
	}
	verifyCache(t, m.HTTPURL(), pk, recent)

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`nixspool_gc_runs_total{result="complete"} 2`, `nixspool_gc_runs_total{result="dry_run"} 2`,
		`nixspool_gc_deleted_objects_total{kind="narinfo"} 22`, "nixspool_gc_last_run_duration_seconds", `nixspool_gc_requests_total{kind="list"}`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestGCFileCache: the same on a file:// cache, where LastModified is the
// file's mtime.
func TestGCFileCache(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-gc-file-1")
	dir := filepath.Join(t.TempDir(), "cache")
	a := newAgent(t, "file://"+dir+"?write-nar-listing=1", sk, nil, "--gc-poll-interval", "200ms", "--upload-build-logs")
	a.Start()
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	old := build(t, env, testenv.WriteGraph(t, t.TempDir(), false))
	a.WaitDrained(2 * time.Minute)
	aged := time.Now().Add(7 * time.Second)
	for time.Now().Before(aged) {
		time.Sleep(100 * time.Millisecond)
	}
	recent := build(t, env, testenv.WriteGraph(t, t.TempDir(), false))
	a.WaitDrained(2 * time.Minute)
	rep, _ := gcReport(t, a, true, "--keep-since", "5s", "--grace", "4s")
	// 11 narinfos, their listings, the build logs of their 9 derivations,
	// and their NARs but those the recent closure shares (outputs with
	// the same contents have the same NAR).
	if rep.Deleted.Narinfos != testenv.GraphPaths || rep.Deleted.NARs == 0 || rep.Deleted.Others != testenv.GraphPaths+9 {
		t.Fatalf("deleted %+v", rep.Deleted)
	}
	for _, p := range closureOf(t, old) {
		if _, err := os.Stat(filepath.Join(dir, storepath.HashPart(p)+".narinfo")); err == nil {
			t.Errorf("%s still has a narinfo", p)
		}
	}
	verifyCache(t, "file://"+dir, pk, recent)
	if _, err := os.Stat(filepath.Join(dir, "nix-cache-info")); err != nil {
		t.Fatal("nix-cache-info was deleted")
	}
}
