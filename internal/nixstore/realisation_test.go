package nixstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/internal/testenv"
)

const caConfig = "experimental-features = nix-command ca-derivations\n"

// buildCA builds a floating content-addressed derivation and one that
// depends on it with env, and returns the second's derivation path.
func buildCA(t *testing.T, env []string) string {
	t.Helper()
	expr := filepath.Join(t.TempDir(), "ca.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`
let
  ca = name: script: builtins.derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" script ]; nonce = "%s";
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
  dep = ca "rs-dep" "echo dep %[1]s > $out";
in ca "rs-top" "echo ${dep} > $out"
`, testenv.Unique())), 0o644)
	testenv.Run(t, env, "nix-build", expr, "--no-out-link")
	return strings.TrimSpace(testenv.Run(t, env, "nix-instantiate", expr))
}

// checkRealisations compares QueryRealisation with `nix realisation info`
// for drv and the realisations it depends on.
func checkRealisations(t *testing.T, s *Store, env []string, drv string) {
	t.Helper()
	ctx := context.Background()
	var want []Realisation
	out := testenv.Run(t, env, "nix", "realisation", "info", "--json", drv)
	if err := json.Unmarshal([]byte(out), &want); err != nil || len(want) != 1 {
		t.Fatalf("nix realisation info: %v\n%s", err, out)
	}
	got, err := s.QueryRealisation(ctx, want[0].ID)
	if err != nil || got == nil {
		t.Fatalf("QueryRealisation(%s) = %v, %v", want[0].ID, got, err)
	}
	if got.OutPath != want[0].OutPath || len(got.DependentRealisations) != 1 || fmt.Sprint(got.DependentRealisations) != fmt.Sprint(want[0].DependentRealisations) {
		t.Fatalf("QueryRealisation = %+v, Nix says %+v", got, want[0])
	}
	for id, p := range got.DependentRealisations {
		dep, err := s.QueryRealisation(ctx, id)
		if err != nil || dep == nil || dep.OutPath != p {
			t.Fatalf("dependency %s: %+v, %v", id, dep, err)
		}
	}
	// The output map agrees (it is how agentd learns the daemon has
	// ca-derivations before asking for a realisation).
	outs, err := s.QueryDerivationOutputMap(ctx, drv)
	if err != nil || outs["out"] != "/nix/store/"+got.OutPath {
		t.Fatalf("QueryDerivationOutputMap = %v, %v", outs, err)
	}
	// Referrers: the input derivation's are what nix-store says, and
	// include drv (how a resolved build's unresolved derivation is found).
	for _, ref := range strings.Fields(testenv.Run(t, env, "nix-store", "-q", "--references", drv)) {
		if !strings.HasSuffix(ref, ".drv") {
			continue
		}
		got, err := s.QueryReferrers(ctx, ref)
		want := strings.Fields(testenv.Run(t, env, "nix-store", "-q", "--referrers", ref))
		slices.Sort(got)
		slices.Sort(want)
		if err != nil || !slices.Equal(got, want) || !slices.Contains(got, drv) {
			t.Fatalf("QueryReferrers(%s) = %v, %v; nix-store says %v", ref, got, err, want)
		}
	}
	none := "sha256:" + strings.Repeat("0", 64) + "!out"
	if r, err := s.QueryRealisation(ctx, none); r != nil || err != nil {
		t.Fatalf("QueryRealisation(unknown) = %+v, %v; want nil, nil", r, err)
	}
	for _, bad := range []string{"", "sha256:abc!out", want[0].ID + "/x", strings.TrimSuffix(want[0].ID, "!out")} {
		if _, err := s.QueryRealisation(ctx, bad); err == nil {
			t.Errorf("QueryRealisation(%q) succeeded", bad)
		}
	}
	// The connection is still good.
	if r, err := s.QueryRealisation(ctx, want[0].ID); err != nil || r == nil {
		t.Fatalf("after bad ids: %v, %v", r, err)
	}
}

func TestRealisationStdio(t *testing.T) {
	testenv.RequireNix(t)
	env := testenv.NixEnv(caConfig)
	drv := buildCA(t, env)
	t.Setenv("NIX_DAEMON_SOCKET_PATH", filepath.Join(t.TempDir(), "no-daemon"))
	t.Setenv("NIX_CONFIG", testenv.NixConfig+caConfig) // nix-daemon --stdio reads it
	s := Open(Options{})
	defer s.Close()
	checkRealisations(t, s, env, drv)
}

func TestRealisationDaemon(t *testing.T) {
	testenv.RequireNix(t)
	d := testenv.StartNixDaemon(t, testenv.NixEnv(caConfig))
	env := d.ClientEnv(testenv.NixEnv(caConfig))
	drv := buildCA(t, env)
	s := Open(Options{Socket: d.Socket})
	defer s.Close()
	checkRealisations(t, s, env, drv)
}

func TestParseRealisation(t *testing.T) {
	doc := `{"dependentRealisations":{"sha256:17ad9e960d8929616deb698aeba7d041e566bfc033956b7fcb6b1f3db352875e!out":"8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b"},"id":"sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out","outPath":"y00dvb16sdgib2sg17lkrizfaf9cvl6m-ca-d","signatures":["b:x","a:y"]}`
	r, err := ParseRealisation([]byte(doc))
	if err != nil || r.OutPath != "y00dvb16sdgib2sg17lkrizfaf9cvl6m-ca-d" || len(r.DependentRealisations) != 1 || r.Signatures[0] != "a:y" {
		t.Fatalf("%+v, %v", r, err)
	}
	// Nix treats signatures and dependencies as optional.
	if r, err := ParseRealisation([]byte(`{"id":"sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out","outPath":"y00dvb16sdgib2sg17lkrizfaf9cvl6m-ca-d"}`)); err != nil || r.DependentRealisations == nil {
		t.Fatalf("minimal: %+v, %v", r, err)
	}
	for _, bad := range []string{
		`not json`,
		`{"id":"sha256:abc!out","outPath":"x"}`,
		`{"id":"sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out","outPath":"/nix/store/x"}`,
		`{"id":"sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out","outPath":""}`,
		`{"id":"sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out","outPath":"x","dependentRealisations":{"bad":"y"}}`,
	} {
		if _, err := ParseRealisation([]byte(bad)); err == nil {
			t.Errorf("ParseRealisation(%s) succeeded", bad)
		}
	}
	if !errors.Is(fmt.Errorf("x: %w", ErrRealisationsUnsupported), ErrRealisationsUnsupported) {
		t.Fatal("unwrap")
	}
}
