package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/testenv"
)

// writeExpr writes a Nix expression whose derivations are made with
//
//	mk NAME DEPS EXTRA
//
// (each output records its dependencies, so the store registers them as
// references; EXTRA is more shell). Every call gets a fresh nonce.
func writeExpr(t *testing.T, body string) string {
	t.Helper()
	nonce := testenv.Unique()
	expr := fmt.Sprintf(`
let
  mk = name: deps: extra: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      mkdir -p $out
      echo ${name} > $out/name
      for d in ${toString deps}; do echo $d >> $out/deps; done
      ${extra}
    '' ];
    nonce = "%s";
    PATH = "/usr/bin:/bin";
  };
in %s
`, nonce, body)
	f := filepath.Join(t.TempDir(), "expr-"+nonce+".nix")
	if err := os.WriteFile(f, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// outputs runs nix-build and returns its output paths by name suffix.
func outputs(t *testing.T, env []string, file string) map[string]string {
	t.Helper()
	out := testenv.Run(t, env, "nix-build", file, "--no-out-link")
	m := map[string]string{}
	for _, p := range strings.Fields(out) {
		if strings.HasPrefix(p, "/nix/store/") {
			m[p[len("/nix/store/")+33:]] = p
		}
	}
	return m
}

// TestFiltersNeverBreakClosures (issue: filters publish unusable closures):
// with the NixOS example's `--exclude -source$` (docs/nixos.md) and a NAR
// size limit, a path that an uploaded path references is uploaded anyway,
// so stock Nix substitutes the whole closure; an excluded path nothing
// needs stays out.
func TestFiltersNeverBreakClosures(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-filters-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--exclude", "-source$", "--max-nar-size", "200000")
	a.Start()
	expr := writeExpr(t, `
let
  src = mk "app-source" [] "";
  big = mk "big-data" [] "head -c 300000 /dev/urandom > $out/blob";
  lonely = mk "lonely-source" [] "";
in [ (mk "app" [ src big ] "") lonely ]`)
	outs := outputs(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), expr)
	for _, p := range testenv.Requisites(t, testenv.NixEnv(""), outs["app"]) {
		outs[p[len("/nix/store/")+33:]] = p
	}
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 {
		t.Fatalf("status %+v", s)
	}
	has := func(name string) bool {
		_, err := m.Client().StatObject(context.Background(), m.Bucket, filepath.Base(outs[name])[:32]+".narinfo", minio.StatObjectOptions{})
		return err == nil
	}
	if !has("app") || !has("app-source") || !has("big-data") || has("lonely-source") {
		t.Fatalf("app %v, app-source %v (excluded, needed), big-data %v (too big, needed), lonely-source %v (excluded, not needed)",
			has("app"), has("app-source"), has("big-data"), has("lonely-source"))
	}
	if s.Skipped < 3 {
		t.Fatalf("skipped = %d, want the three filtered jobs counted", s.Skipped)
	}
	verifyCache(t, m.HTTPURL(), pk, outs["app"])
}

// TestBucketResetIsNoticed (issue: a stale presence cache publishes
// incomplete closures): after the bucket is emptied, agentd forgets what it
// held, while running and across a restart, and uploads the dependencies of
// the next build again instead of naming references that are gone.
func TestBucketResetIsNoticed(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-reset-1")
	a := newAgent(t, m.CacheURL(""), sk, m.Env(), "--cache-check-interval", "1s")
	a.Start()
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	base := testenv.WriteGraph(t, t.TempDir(), false)
	build(t, env, base)
	a.WaitDrained(2 * time.Minute)
	wipe := func() {
		t.Helper()
		c := m.Client()
		for o := range c.ListObjects(context.Background(), m.Bucket, minio.ListObjectsOptions{Recursive: true}) {
			if err := c.RemoveObject(context.Background(), m.Bucket, o.Key, minio.RemoveObjectOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Builds on top of the base graph: only the new top is built (and
	// queued); its closure holds the base graph's paths.
	onTop := func(name string) string {
		return build(t, env, &testenv.Graph{File: writeExpr(t, fmt.Sprintf(`mk %q [ (import %s) ] ""`, name, base.File))})
	}

	// While running.
	wipe()
	top := onTop("after-wipe")
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 {
		t.Fatalf("status %+v", s)
	}
	if !strings.Contains(a.log.String(), "forgetting what it held") {
		t.Errorf("agentd did not log noticing the reset:\n%s", a.log.String())
	}
	verifyCache(t, m.HTTPURL(), pk, top)

	// Across a restart (the presence cache is persisted).
	a.Stop()
	wipe()
	a.Start()
	top = onTop("after-restart")
	if s := a.WaitDrained(2 * time.Minute); s.Failed != 0 {
		t.Fatalf("status %+v", s)
	}
	verifyCache(t, m.HTTPURL(), pk, top)

	// An operator can force it too.
	if out, err := a.Ctl("forget"); err != nil || !strings.Contains(out, "forgot") {
		t.Fatalf("agentctl forget: %v\n%s", err, out)
	}
	if s := a.Status(); s.KnownPresent != 0 {
		t.Fatalf("known_present = %d after forget", s.KnownPresent)
	}
}

// narinfoWrites records, per narinfo key, the agents whose PUT of it the
// server accepted.
type narinfoWrites struct {
	mu sync.Mutex
	ok map[string][]string
}

func (w *narinfoWrites) watch(p *testenv.FaultProxy, who string) {
	p.OnResponse = func(r *http.Request, status int) {
		if r.Method != http.MethodPut || status != http.StatusOK || !strings.HasSuffix(r.URL.Path, ".narinfo") {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		k := filepath.Base(r.URL.Path)
		w.ok[k] = append(w.ok[k], who)
	}
}

// TestTwoAgentsShareABucket (issue: re-uploads overwrite narinfos): two
// agentd processes with their own keys and state directories push
// overlapping closures into one bucket at the same time. No narinfo is
// ever written twice, each keeps the signature of the agent that wrote it,
// both closures substitute, and pushing an already cached closure from a
// fresh machine sends nothing.
func TestTwoAgentsShareABucket(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	skA, pkA := keyPair(t, "e2e-machine-a")
	skB, pkB := keyPair(t, "e2e-machine-b")
	proxyA, proxyB := testenv.StartFaultProxy(t, m.Endpoint), testenv.StartFaultProxy(t, m.Endpoint)
	writes := &narinfoWrites{ok: map[string][]string{}}
	writes.watch(proxyA, "a")
	writes.watch(proxyB, "b")
	a := newAgent(t, m.CacheURLVia(proxyA), skA, m.Env())
	b := newAgent(t, m.CacheURLVia(proxyB), skB, m.Env())
	b.SkipAudit = true // one audit of the shared bucket is enough
	a.Start()
	b.Start()

	// Two closures sharing a graph, built once (no hook); each machine
	// pushes its closure, both at the same time.
	env := testenv.NixEnv("")
	shared := testenv.WriteGraph(t, t.TempDir(), true)
	topA := build(t, env, &testenv.Graph{File: writeExpr(t, fmt.Sprintf(`mk "top-a" [ (import %s) ] ""`, shared.File))})
	topB := build(t, env, &testenv.Graph{File: writeExpr(t, fmt.Sprintf(`mk "top-b" [ (import %s) ] ""`, shared.File))})
	var wg sync.WaitGroup
	for _, c := range []struct {
		ag  *Agent
		top string
	}{{a, topA}, {b, topB}, {a, topB}, {b, topA}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := c.ag.Ctl("push", "--closure", c.top); err != nil {
				t.Errorf("push: %v\n%s", err, out)
			}
		}()
	}
	wg.Wait()
	a.WaitDrained(2 * time.Minute)
	b.WaitDrained(2 * time.Minute)

	// No narinfo was written twice, and each carries its writer's key.
	writes.mu.Lock()
	for k, who := range writes.ok {
		if len(who) != 1 {
			t.Errorf("%s was written %d times (by %v)", k, len(who), who)
			continue
		}
		data, err := getObject(m, k)
		if err != nil {
			t.Fatal(err)
		}
		ni, err := cachefmt.ParseNarInfo(data)
		if err != nil {
			t.Fatalf("%s: %v", k, err)
		}
		want := map[string]string{"a": "e2e-machine-a:", "b": "e2e-machine-b:"}[who[0]]
		if len(ni.Sigs) != 1 || !strings.HasPrefix(ni.Sigs[0], want) {
			t.Errorf("%s written by %s carries %v", k, who[0], ni.Sigs)
		}
	}
	total := len(writes.ok)
	writes.mu.Unlock()
	if want := testenv.GraphPaths + 2; total != want {
		t.Fatalf("%d narinfos written, want %d", total, want)
	}
	keys := pkA + " " + pkB
	verifyCache(t, m.HTTPURL(), keys, topA)
	verifyCache(t, m.HTTPURL(), keys, topB)

	// A fresh machine pushing an already cached closure sends nothing.
	c := newAgent(t, m.CacheURLVia(proxyB), skB, m.Env())
	c.SkipAudit = true
	var puts sync.Map
	proxyB.OnResponse = func(r *http.Request, status int) {
		if r.Method == http.MethodPut && !strings.Contains(r.URL.Path, "/nixspool/") {
			puts.Store(r.URL.Path, status)
		}
	}
	c.Start()
	if out, err := c.Ctl("push", "--closure", topA); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	if s := c.WaitDrained(time.Minute); s.Failed != 0 || s.UploadedPaths != 0 {
		t.Fatalf("re-push of a cached closure: %+v", s)
	}
	puts.Range(func(k, v any) bool {
		t.Errorf("re-push sent PUT %s (%v)", k, v)
		return true
	})
}

func getObject(m *testenv.MinIO, key string) ([]byte, error) {
	obj, err := m.Client().GetObject(context.Background(), m.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, err
	}
	defer obj.Close()
	return io.ReadAll(obj)
}
