package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/storepath"
)

// TestKillLoopCAWithStoreGC: rounds of floating content-addressed builds
// (with a CA derivation depending on another and an input-addressed one
// depending on a CA one) while agentd is killed with SIGKILL before or
// during the build, so that some requests reach agentd and the others are
// spooled; while agentd is down the Nix store is garbage collected
// (nix-store --delete of every store path of the test, the collector
// restricted to them so that other tests' garbage is left alone). In the
// end every output built and every realisation Nix registered for the
// builds is in the bucket, nothing is failed or left in the spool, and the
// bucket passes the deep audit.
func TestKillLoopCAWithStoreGC(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, _ := keyPair(t, "e2e-kill-gc-1")
	roots := filepath.Join("/nix/var/nix/gcroots", "nixspool-test-"+testenv.Unique())
	t.Cleanup(func() { os.RemoveAll(roots) })
	a := newAgent(t, m.CacheURL(""), sk, append(m.Env(), "NIX_CONFIG="+testenv.NixConfig+caConfig), "--gc-roots", roots)
	env := testenv.NixEnv(hookConfig()+caConfig, a.HookEnv()...)
	caEnv := testenv.NixEnv(caConfig)
	marker := filepath.Join(t.TempDir(), "first-machine")
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	attrs := []string{"lone", "top", "ia"}

	var outs []string
	ids := map[string]string{} // realisation id → round and attribute
	var exprs []string
	const rounds = 4
	for round := 0; round < rounds; round++ {
		expr := writeCAGraph(t, marker)
		exprs = append(exprs, expr)
		args := []string{expr, "--no-out-link"}
		for _, attr := range attrs {
			args = append(args, "-A", attr)
		}
		// Round 0: agentd is down for the whole build (everything is
		// spooled); then it is killed 0.8 s and 0.4 s into the build, and
		// after the build once an upload is done.
		if round > 0 {
			a.Start()
		}
		build := exec.Command("nix-build", args...)
		build.Env = env
		var stdout, stderr strings.Builder
		build.Stdout, build.Stderr = &stdout, &stderr
		if err := build.Start(); err != nil {
			t.Fatal(err)
		}
		switch round {
		case 1, 2:
			time.Sleep(time.Duration(3-round) * 400 * time.Millisecond)
			a.Kill()
		}
		if err := build.Wait(); err != nil {
			t.Fatalf("round %d: nix-build: %v\n%s", round, err, stderr.String())
		}
		if round == rounds-1 {
			// Killed after the build, once uploads are under way.
			before := a.Status().Uploaded
			testenv.Poll(t, 30*time.Second, "an upload", func() bool { return a.Status().Uploaded > before })
			a.Kill()
		}
		built := strings.Fields(stdout.String())
		if len(built) != len(attrs) {
			t.Fatalf("round %d: nix-build printed %v", round, built)
		}
		outs = append(outs, built...)
		spooled := strings.Count(stderr.String(), "spooled to")
		t.Logf("round %d: %d hook request(s) spooled", round, spooled)
		// What Nix registered, asked before the collection deletes the
		// derivations (nix-instantiate writes them again).
		for _, attr := range attrs {
			_, is := realisationIDs(t, caEnv, expr, attr)
			for _, id := range is {
				ids[id] = fmt.Sprintf("round %d, %s", round, attr)
			}
		}
		// base, built as a dependency of top and ia, is acknowledged too.
		for _, r := range testenv.Requisites(t, caEnv, built[1]) {
			if !contains(outs, r) {
				outs = append(outs, r)
			}
		}
		collect(t, caEnv, exprs, outs)
	}
	a.Start()
	s := a.WaitDrained(time.Minute)
	if s.Failed != 0 || s.Spooled.Files != 0 {
		out, _ := a.Ctl("list", "--state", "failed")
		t.Fatalf("status = %+v\n%s", s, out)
	}
	if l, err := spool.Scan(filepath.Join(a.StateDir, "spool")); err != nil || len(l.Files)+len(l.Bad)+len(l.Odd) != 0 {
		t.Fatalf("spool left: %+v %v", l, err)
	}
	keys := map[string]bool{}
	for _, k := range m.Keys(t) {
		keys[k] = true
	}
	for _, p := range outs {
		if !keys[storepath.HashPart(p)+".narinfo"] {
			t.Errorf("acknowledged path %s is not in the bucket", p)
		}
	}
	for id, what := range ids {
		if !keys[realisation.Key(id)] {
			t.Errorf("realisation %s (%s) is not in the bucket", id, what)
		}
	}
	if t.Failed() {
		t.Logf("agentd log:\n%s", a.log.String())
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// collect garbage-collects the store paths of the test: the outputs, the
// derivations of the expressions with their closures, and the derivations
// Nix wrote when it resolved them (named as the others, holding the same
// nonce) that the collector finds dead.
func collect(t *testing.T, env []string, exprs, outs []string) {
	t.Helper()
	set := map[string]bool{}
	for _, p := range outs {
		set[p] = true
	}
	for _, expr := range exprs {
		src, err := os.ReadFile(expr)
		if err != nil {
			t.Fatal(err)
		}
		nonce := between(string(src), `nonce = "`, `"`)
		for _, name := range []string{"ca-lone", "ca-base", "ca-top", "ia-on-ca"} {
			drvs, _ := filepath.Glob("/nix/store/*-" + name + ".drv")
			for _, d := range drvs {
				if b, err := os.ReadFile(d); err == nil && strings.Contains(string(b), nonce) {
					set[d] = true
				}
			}
		}
	}
	// The collector's own view of what is dead, for the whole store (it
	// only prints), then one deletion of the dead paths of the test.
	dead := strings.Fields(testenv.Run(t, env, "nix-store", "--gc", "--print-dead"))
	var doomed []string
	for _, p := range dead {
		if set[p] {
			doomed = append(doomed, p)
		}
	}
	if len(doomed) > 0 {
		testenv.Run(t, env, "nix-store", append([]string{"--delete"}, doomed...)...)
	}
	t.Logf("garbage collection: %d of the test's %d store paths deleted", len(doomed), len(set))
}

func between(s, start, end string) string {
	_, rest, _ := strings.Cut(s, start)
	v, _, _ := strings.Cut(rest, end)
	return v
}
