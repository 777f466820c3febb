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
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/testenv"
)

// caConfig turns on content-addressed derivations (Nix 2.8).
const caConfig = "experimental-features = nix-command ca-derivations\n"

// writeCAGraph writes content-addressed derivations whose builders run
// only while marker exists (so only on the "first machine"):
//
//	lone   floating CA, no inputs
//	base   floating CA, no inputs
//	top    floating CA, depends on base and refers to its output
//	ia     input-addressed, depends on base (deferred: its output path
//	       is known only once base is built)
//	multi  floating CA with two outputs, dev referring to out
//	twin   another derivation with lone's output (same name and contents)
func writeCAGraph(t *testing.T, marker string) string {
	t.Helper()
	expr := fmt.Sprintf(`
let
  nonce = "%s";
  mk = name: ca: script: extra: builtins.derivation ({
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      if ! test -e %s; then echo "not the first machine: refusing to build ${name}" >&2; exit 1; fi
      ${script}
    '' ];
  } // extra // (if ca then { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; } else {}));
  lone = mk "ca-lone" true "echo lone ${nonce} > $out" {};
  base = mk "ca-base" true "mkdir $out; echo base ${nonce} > $out/data" {};
  top = mk "ca-top" true "echo ${base}/data > $out" {};
  ia = mk "ia-on-ca" false "echo ${base} > $out" {};
  multi = mk "ca-multi" true "echo multi ${nonce} > $out; echo $out > $dev" { outputs = [ "out" "dev" ]; };
  twin = mk "ca-lone" true "echo lone ${nonce} > $out" { twin = "yes"; };
in { inherit lone base top ia multi twin; }
`, testenv.Unique(), marker)
	f := filepath.Join(t.TempDir(), "ca.nix")
	if err := os.WriteFile(f, []byte(expr), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// realisationIDs returns the ids Nix registered for the outputs of the
// derivation of attr (nix realisation info).
func realisationIDs(t *testing.T, env []string, expr, attr string) (drv string, ids []string) {
	t.Helper()
	drv = strings.TrimSpace(testenv.Run(t, env, "nix-instantiate", expr, "-A", attr))
	drv, _, _ = strings.Cut(drv, "!") // multi.dev: drv!dev
	var infos []struct {
		ID string `json:"id"`
	}
	out := testenv.Run(t, env, "nix", "realisation", "info", "--json", drv)
	if err := json.Unmarshal([]byte(out), &infos); err != nil || len(infos) == 0 {
		t.Fatalf("nix realisation info %s: %v\n%s", drv, err, out)
	}
	for _, i := range infos {
		ids = append(ids, i.ID)
	}
	return drv, ids
}

// TestCARealisationsSubstitute: content-addressed derivations are built
// with the hook on the first machine; agentd uploads their outputs and
// realisations to MinIO; a fresh store whose only substituter is the
// cache (over HTTP, with our key trusted) then gets the same output paths
// for the same expression without building: a floating CA derivation, a
// CA derivation depending on another one, an input-addressed derivation
// depending on a CA one, and a second derivation whose output was in the
// cache already when it was built. The builders refuse to run off the
// first machine, so building would fail. A copy of the cache without the
// realisations does not work, which shows they are what made it work.
// Single-user (agentd runs nix-daemon --stdio) and multi-user (builds and
// agentd go through a nix-daemon with the hook, as on NixOS).
func TestCARealisationsSubstitute(t *testing.T) {
	t.Run("single-user", func(t *testing.T) { testCARealisations(t, false) })
	t.Run("multi-user", func(t *testing.T) { testCARealisations(t, true) })
}

func testCARealisations(t *testing.T, multiUser bool) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-ca-realisations-1")
	// agentd's store connection needs ca-derivations too, to resolve
	// floating outputs and read realisations.
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	a := newAgent(t, m.CacheURL(""), sk, append(m.Env(), "NIX_CONFIG="+testenv.NixConfig+caConfig), "--metrics-listen", metricsAddr)
	var env []string
	if multiUser {
		daemon := testenv.StartNixDaemon(t, testenv.NixEnv(hookConfig()+caConfig, a.HookEnv()...))
		a.args = append(a.args, "--nix-daemon-socket", daemon.Socket)
		env = daemon.ClientEnv(testenv.NixEnv(caConfig))
	} else {
		env = testenv.NixEnv(hookConfig()+caConfig, a.HookEnv()...)
	}
	a.Start()

	marker := filepath.Join(t.TempDir(), "first-machine")
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	expr := writeCAGraph(t, marker)
	attrs := []string{"lone", "base", "top", "ia", "multi", "multi.dev", "twin"}
	args := []string{expr, "--no-out-link"}
	for _, attr := range attrs[:6] {
		args = append(args, "-A", attr)
	}
	outs := strings.Fields(testenv.Run(t, env, "nix-build", args...))
	if len(outs) != 6 {
		t.Fatalf("nix-build printed %v, want 6 outputs", outs)
	}
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 {
		t.Fatalf("status = %+v", s)
	}
	// twin's output is lone's, in the cache already: only its
	// realisation is new.
	if twin := strings.TrimSpace(testenv.Run(t, env, "nix-build", expr, "--no-out-link", "-A", "twin")); twin != outs[0] {
		t.Fatalf("twin built %s, want lone's output %s", twin, outs[0])
	}
	args = append(args, "-A", "twin")
	outs = append(outs, outs[0])
	s = a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 || s.UploadedPaths != 6 {
		t.Fatalf("status = %+v, want 6 paths uploaded", s)
	}

	// Every realisation Nix registered for these derivations is in the
	// bucket, in the layout Nix 2.8 reads.
	caEnv := testenv.NixEnv(caConfig)
	keys := map[string]bool{}
	for _, k := range m.Keys(t) {
		keys[k] = true
	}
	drvs := map[string]string{}
	for _, attr := range attrs {
		drv, ids := realisationIDs(t, caEnv, expr, attr)
		drvs[attr] = drv
		for _, id := range ids {
			if !keys[realisation.Key(id)] {
				t.Errorf("%s: bucket lacks %s", attr, realisation.Key(id))
			}
		}
	}
	// Derivations without inputs are their own resolved form: Nix 2.35's
	// layout too.
	for _, o := range []struct{ attr, output string }{{"lone", "out"}, {"base", "out"}, {"multi", "out"}, {"multi", "dev"}} {
		if k := realisation.BuildTraceKey(filepath.Base(drvs[o.attr]), o.output); !keys[k] {
			t.Errorf("bucket lacks %s", k)
		}
	}
	var doi int
	for k := range keys {
		if strings.HasSuffix(k, ".doi") {
			doi++
		}
	}
	// lone, twin, base and multi's two outputs: both layouts; top: its
	// own and its resolved derivation's (that one in both layouts); ia:
	// its own (ia resolved is input-addressed: no realisation needed).
	if s.UploadedRealisations < uint64(doi) || doi != 14 {
		t.Errorf("uploaded_realisations = %d, %d .doi objects in the bucket (want 14)", s.UploadedRealisations, doi)
	}
	if out, _ := a.Ctl("status"); !strings.Contains(out, fmt.Sprintf("%d realisations", s.UploadedRealisations)) {
		t.Errorf("agentctl status does not show the realisations:\n%s", out)
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := fmt.Sprintf("nixspool_realisations_uploaded_total %d\n", s.UploadedRealisations); !strings.Contains(string(body), want) {
		t.Errorf("metrics lack %q", want)
	}
	// Our signatures on narinfos and realisations verify.
	cmd := exec.Command(bin("agentd"), "audit", "--cache", m.CacheURL(""), "--trusted-public-keys", pk)
	cmd.Env = a.env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("audit with the trusted key: %v\n%s", err, out)
	}

	// Off the first machine: the builders refuse.
	if err := os.Remove(marker); err != nil {
		t.Fatal(err)
	}
	substitute := func(cacheURL string) (string, error) {
		fresh := filepath.Join(t.TempDir(), "fresh")
		// A private client cache: Nix remembers realisations and misses.
		cenv := testenv.NixEnv(caConfig, "XDG_CACHE_HOME="+t.TempDir())
		cmd := exec.Command("nix-build", append(args, "--store", fresh,
			"--option", "substituters", cacheURL, "--option", "trusted-public-keys", pk)...)
		cmd.Env = cenv
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		for _, o := range outs {
			if _, serr := os.Lstat(filepath.Join(fresh, o)); serr != nil && err == nil {
				err = fmt.Errorf("%s is not in the fresh store: %v", o, serr)
			}
		}
		log := stdout.String() + stderr.String()
		if err == nil && (stdout.String() != strings.Join(outs, "\n")+"\n" || strings.Contains(log, "not the first machine") || strings.Contains(log, "building '")) {
			err = fmt.Errorf("outputs %q, want %q, or a builder ran", stdout.String(), outs)
		}
		if err == nil {
			// The fresh store registered the realisations it substituted.
			for _, attr := range []string{"lone", "top", "ia", "multi", "twin"} {
				if out, rerr := testenv.Output(cenv, "nix", "realisation", "info", "--store", fresh, drvs[attr]); rerr != nil {
					err = fmt.Errorf("realisation of %s not registered in the fresh store: %v\n%s", attr, rerr, out)
				}
			}
		}
		return log, err
	}
	if log, err := substitute(m.HTTPURL()); err != nil {
		t.Fatalf("substituting from the cache: %v\n%s", err, log)
	}

	// The same objects minus the realisations: Nix has no way to find
	// the outputs of these derivations and tries to build them.
	bare := "bare-" + testenv.Unique()
	m.MakeBucket(bare)
	c := m.Client()
	ctx := context.Background()
	for k := range keys {
		if strings.HasSuffix(k, ".doi") {
			continue
		}
		if _, err := c.CopyObject(ctx, minio.CopyDestOptions{Bucket: bare, Object: k}, minio.CopySrcOptions{Bucket: m.Bucket, Object: k}); err != nil {
			t.Fatal(err)
		}
	}
	log, err := substitute("http://" + m.Endpoint + "/" + bare)
	if err == nil {
		t.Fatalf("a cache without realisations substituted the CA outputs:\n%s", log)
	}
	t.Logf("without realisations, as expected: %v", err)
}

// TestCAResolvedOnlyFindsUnresolved: what a Nix 2.33 or later builder
// gives agentd is the resolved derivation only (the hook's DRV_PATH and
// the output's deriver). Nix 2.8 cannot run such a hook, so here no hook
// runs at all: `top` (a CA derivation depending on CA `base`) is built,
// then its output is pushed with `agentctl push`, which names no
// derivation, and its deriver is the resolved derivation. agentd finds
// the unresolved `top` through the real daemon's referrers and publishes
// its realisation, and a fresh store substitutes `top` from the cache
// without building, which needs exactly that realisation.
func TestCAResolvedOnlyFindsUnresolved(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-ca-resolved-1")
	a := newAgent(t, m.CacheURL(""), sk, append(m.Env(), "NIX_CONFIG="+testenv.NixConfig+caConfig))
	a.Start()
	env := testenv.NixEnv(caConfig)

	marker := filepath.Join(t.TempDir(), "first-machine")
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	expr := writeCAGraph(t, marker)
	top := strings.TrimSpace(testenv.Run(t, env, "nix-build", expr, "--no-out-link", "-A", "top"))
	topDrv, topIDs := realisationIDs(t, env, expr, "top")
	_, baseIDs := realisationIDs(t, env, expr, "base")
	if deriver := strings.TrimSpace(testenv.Run(t, env, "nix-store", "-q", "--deriver", top)); deriver == topDrv {
		t.Fatalf("the output's deriver is the unresolved derivation %s: nothing to find", deriver)
	}
	if out, err := a.Ctl("push", top); err != nil {
		t.Fatalf("agentctl push: %v\n%s", err, out)
	}
	if s := a.WaitDrained(2 * time.Minute); s.Failed != 0 {
		t.Fatalf("status = %+v", s)
	}
	keys := map[string]bool{}
	for _, k := range m.Keys(t) {
		keys[k] = true
	}
	for _, id := range append(topIDs, baseIDs...) {
		if !keys[realisation.Key(id)] {
			t.Errorf("bucket lacks %s", realisation.Key(id))
		}
	}

	if err := os.Remove(marker); err != nil {
		t.Fatal(err)
	}
	fresh := filepath.Join(t.TempDir(), "fresh")
	cmd := exec.Command("nix-build", expr, "--no-out-link", "-A", "top", "--store", fresh,
		"--option", "substituters", m.HTTPURL(), "--option", "trusted-public-keys", pk)
	cmd.Env = testenv.NixEnv(caConfig, "XDG_CACHE_HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), top) || strings.Contains(string(out), "not the first machine") {
		t.Fatalf("substituting top: %v\n%s", err, out)
	}
	auditCache(t, m.CacheURL(""), a.env)
}
