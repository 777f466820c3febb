package drvhash

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/internal/testenv"
)

// Derivations and realisation ids generated with Nix 2.8.0: b is a
// floating content-addressed derivation, d depends on b, dRes is d
// resolved (b's output substituted for its placeholder); the ids are what
// `nix realisation info --json` printed for them.
const (
	bPath = "/nix/store/scqqla1vibi73xi7h3is2hzqh9djpk7a-ca-b.drv"
	bDrv  = `Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo b-exp920810966 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","ca-b"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
	dDrv  = `Derive([("out","","r:sha256","")],[("/nix/store/scqqla1vibi73xi7h3is2hzqh9djpk7a-ca-b.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo /0zf31fpnxhajsk7p962l69a7crhf56rlnma9kmjk342m1cmm0q4d > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","ca-d"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
	dRes  = `Derive([("out","","r:sha256","")],[],["/nix/store/8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b"],"x86_64-linux","/bin/sh",["-c","echo /nix/store/8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","ca-d"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
)

func TestIDsMatchNix(t *testing.T) {
	h := &Hasher{Read: func(p string) ([]byte, error) {
		if p == bPath {
			return []byte(bDrv), nil
		}
		return nil, os.ErrNotExist
	}}
	for _, c := range []struct{ name, drv, want string }{
		{"b", bDrv, "sha256:17ad9e960d8929616deb698aeba7d041e566bfc033956b7fcb6b1f3db352875e!out"},
		{"d", dDrv, "sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out"},
		{"d resolved", dRes, "sha256:dac46ccad62f5e1504df177cfcd3c6f1d6f7c76f3c78e493f8fb0a5982d34c96!out"},
	} {
		d, err := Parse([]byte(c.drv))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := string(d.Unparse(false, nil)); got != c.drv {
			t.Errorf("%s: Unparse does not reproduce the file:\n%s\n%s", c.name, got, c.drv)
		}
		if d.StaticOutputs() {
			t.Errorf("%s: floating output counted as static", c.name)
		}
		id, err := h.ID(d, "out")
		if err != nil || id != c.want {
			t.Errorf("%s: ID = %q, %v; want %q", c.name, id, err, c.want)
		}
	}
	d, _ := Parse([]byte(dDrv))
	if _, err := h.ID(d, "dev"); err == nil {
		t.Error("ID of a missing output succeeded")
	}
	// d's hash needs b's: without it there is no answer, and no guess.
	if _, err := (&Hasher{Read: func(string) ([]byte, error) { return nil, os.ErrNotExist }}).ID(d, "out"); err == nil {
		t.Error("ID without the input derivation succeeded")
	}
}

func TestEscapesAndKinds(t *testing.T) {
	src := `Derive([("dev","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev","",""),("out","","","")],[],[],"x86_64-linux","/bin/sh",["-c","printf \"a\\tb\\n\" > $out; echo \\\\ \r"],[("out","/nix/store/x"),("quote","say \"hi\"\nbye")])`
	d, err := Parse([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if d.Args[1] != "printf \"a\\tb\\n\" > $out; echo \\\\ \r" {
		t.Errorf("args[1] = %q", d.Args[1])
	}
	if d.Env[1].Value != "say \"hi\"\nbye" {
		t.Errorf("env value = %q", d.Env[1].Value)
	}
	if got := string(d.Unparse(false, nil)); got != src {
		t.Errorf("round trip:\n%s\n%s", got, src)
	}
	masked := string(d.Unparse(true, nil))
	if !strings.Contains(masked, `("dev","","","")`) || !strings.Contains(masked, `("out","")`) || !strings.Contains(masked, `("quote","say`) {
		t.Errorf("masked = %s", masked)
	}
	if d.Outputs[0].Kind() != InputAddressed || d.Outputs[1].Kind() != Deferred {
		t.Errorf("kinds = %v %v", d.Outputs[0].Kind(), d.Outputs[1].Kind())
	}
	for _, o := range []Output{{HashAlgo: "r:sha256"}, {HashAlgo: "sha256", Hash: "ab", Path: "/nix/store/x"}, {HashAlgo: "r:sha256", Hash: "impure"}} {
		if k := o.Kind(); k != map[string]Kind{"": Floating, "ab": Fixed, "impure": Impure}[o.Hash] {
			t.Errorf("%+v: kind %v", o, k)
		}
	}
}

func TestParseRejectsMalformed(t *testing.T) {
	for _, bad := range []string{
		"",
		"Derive(",
		`Derive([],[],[],"x","y",[],[])`, // no outputs
		`Derive([("out","","","")],[],[],"x","/bin/sh",[],[])junk`,
		`Derive([("out","","",""),("dev","","","")],[],[],"x","/bin/sh",[],[])`, // unsorted
		`Derive([("out","","","")],[],[],"x","/bin/sh",[],[("b","1"),("a","2")])`,
		`Derive([("out","","","")],[],[],"x","/bin/sh",["unterminated],[])`,
		`DrvWithVersion("xp-dyn-drv",[("out","","","")],[],[],"x","/bin/sh",[],[])`,
		`Derive([("out","",""])],[],[],"x","/bin/sh",[],[])`,
	} {
		if _, err := Parse([]byte(bad)); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(bDrv))
	f.Add([]byte(dDrv))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := Parse(b)
		if err != nil {
			return
		}
		// Whatever parses prints back to something that parses the same.
		d2, err := Parse(d.Unparse(false, nil))
		if err != nil {
			t.Fatalf("reparse: %v", err)
		}
		if !bytes.Equal(d.Unparse(false, nil), d2.Unparse(false, nil)) {
			t.Fatal("unstable round trip")
		}
	})
}

// TestStoreDerivationsRoundTrip: derivations Nix itself wrote print back
// byte for byte. The test instantiates its own (nothing is built, and
// nothing already in the store is relied on): input-addressed ones with
// inputs, several outputs, fixed-output ones (flat and recursive, sha1 and
// sha256), floating content-addressed ones and one depending on them,
// structured attributes, passAsFile, input sources, and strings with
// quotes, backslashes, tabs, newlines, carriage returns, dollars and
// non-ASCII text.
func TestStoreDerivationsRoundTrip(t *testing.T) {
	testenv.RequireNix(t)
	env := testenv.NixEnv("experimental-features = nix-command ca-derivations\n")
	dir := t.TempDir()
	nonce := testenv.Unique()
	if err := os.WriteFile(filepath.Join(dir, "src.txt"), []byte("a source file "+nonce+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	expr := filepath.Join(dir, "drvs.nix")
	if err := os.WriteFile(expr, []byte(fmt.Sprintf(`
let
  mk = name: attrs: builtins.derivation ({
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; nonce = "%[1]s";
  } // attrs);
  ca = { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  plain = mk "plain" { args = [ "-c" "echo plain > $out" ]; };
  strings = mk "strings" {
    args = [ "-c" "printf 'a\\tb\\n' > $out; echo \"\\\\ $HOME\"" ];
    quoted = "say \"hi\"\n\tbye\r\n";
    backslashes = "\\ \\\\ \\n";
    dollar = "\${plain} $out $${x} \$";
    unicode = "λ → ✓ ü";
    empty = "";
  };
  multi = mk "multi" { outputs = [ "out" "dev" "doc" ]; args = [ "-c" "echo ${plain} > $out; echo > $dev; echo > $doc" ]; };
  flat = mk "fod-flat" {
    args = [ "-c" "echo hello > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
  };
  recursive = mk "fod-recursive" {
    args = [ "-c" "mkdir $out" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha1";
    outputHash = "0000000000000000000000000000000000000000";
  };
  floating = mk "floating" (ca // { args = [ "-c" "echo ${plain} > $out" ]; });
  floatingMulti = mk "floating-multi" (ca // { outputs = [ "out" "lib" ]; args = [ "-c" "echo ${floating} > $out; echo > $lib" ]; });
  deferred = mk "deferred" { args = [ "-c" "echo ${floatingMulti.lib} ${flat} > $out" ]; };
  structured = mk "structured" {
    __structuredAttrs = true;
    args = [ "-c" "cat .attrs.json > $out" ];
    list = [ 1 "two" [ 3 ] { four = 4; } ];
    set = { nested.value = true; text = "x\ny"; };
    dep = multi.dev;
  };
  files = mk "files" {
    args = [ "-c" "cat $textPath ${./src.txt} ${builtins.toFile "note" "a note"} > $out" ];
    passAsFile = [ "text" ];
    text = "passed as a file";
    inputs = [ recursive deferred structured strings ];
  };
in files
`, nonce)), 0o644); err != nil {
		t.Fatal(err)
	}
	top := strings.TrimSpace(testenv.Run(t, env, "nix-instantiate", expr))
	var drvs []string
	for _, p := range testenv.Requisites(t, env, top) {
		if strings.HasSuffix(p, ".drv") {
			drvs = append(drvs, p)
		}
	}
	if len(drvs) != 10 {
		t.Fatalf("only %d derivations instantiated: %v", len(drvs), drvs)
	}
	for _, p := range drvs {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		d, err := Parse(b)
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		if got := d.Unparse(false, nil); !bytes.Equal(got, b) {
			t.Errorf("%s does not round-trip:\n%s\n%s", p, got, b)
		}
	}
	t.Logf("%d derivations", len(drvs))
}

// TestAgainstNix builds a graph of every kind of derivation output with
// Nix 2.8 and ca-derivations, and compares every realisation id Nix
// registered with the one computed here: floating CA outputs with and
// without inputs, a multi-output floating derivation, a deferred
// input-addressed derivation (depends on floating outputs), two
// different fixed-output derivations with the same output (their hashes
// collapse into one input), and plain input-addressed derivations.
func TestAgainstNix(t *testing.T) {
	testenv.RequireNix(t)
	env := testenv.NixEnv("experimental-features = nix-command ca-derivations\n")
	nonce := testenv.Unique()
	expr := filepath.Join(t.TempDir(), "graph.nix")
	os.WriteFile(expr, []byte(fmt.Sprintf(`
let
  sh = "/bin/sh";
  ca = { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  mk = name: attrs: builtins.derivation ({
    inherit name; system = builtins.currentSystem; builder = sh; PATH = "/usr/bin:/bin"; nonce = "%[1]s";
  } // attrs);
  fod = arg: builtins.derivation {
    name = "fod-%[1]s"; system = builtins.currentSystem; builder = sh; PATH = "/usr/bin:/bin";
    args = [ "-c" "echo hello > $out # ${arg}" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
  };
  fod1 = fod "one"; fod2 = fod "two";
  b = mk "b" (ca // { args = [ "-c" "echo b > $out" ]; });
  multi = mk "multi" (ca // { outputs = [ "out" "dev" ]; args = [ "-c" "echo ${b} > $out; echo \"quoted\ttab\" > $dev" ]; });
  c = mk "c" (ca // { args = [ "-c" "cat ${b} ${multi.dev} ${fod1} ${fod2} > $out" ]; });
  deferred = mk "deferred" { args = [ "-c" "echo ${c} > $out" ]; };
  plain = mk "plain" { args = [ "-c" "echo plain > $out" ]; };
  top = mk "top" { args = [ "-c" "echo ${plain} ${deferred} > $out" ]; };
in { inherit fod1 fod2 b multi c deferred plain top; }
`, nonce)), 0o644)
	testenv.Run(t, env, "nix-build", expr, "--no-out-link")
	h := &Hasher{}
	checked := 0
	for _, attr := range []string{"fod1", "fod2", "b", "multi", "c", "deferred", "plain", "top"} {
		drvPath := strings.TrimSpace(testenv.Run(t, env, "nix-instantiate", expr, "-A", attr))
		var infos []struct {
			ID string `json:"id"`
		}
		out := testenv.Run(t, env, "nix", "realisation", "info", "--json", drvPath)
		if err := json.Unmarshal([]byte(out), &infos); err != nil {
			t.Fatalf("%s: %v\n%s", attr, err, out)
		}
		d, err := h.Load(drvPath)
		if err != nil {
			t.Fatal(err)
		}
		var want, got []string
		for _, i := range infos {
			want = append(want, i.ID)
		}
		for _, o := range d.Outputs {
			id, err := h.ID(d, o.Name)
			if err != nil {
				t.Fatalf("%s: %v", attr, err)
			}
			got = append(got, id)
		}
		sort.Strings(want)
		sort.Strings(got)
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s (%s): ids %v, Nix says %v", attr, drvPath, got, want)
		}
		checked += len(want)
		if raw, _ := os.ReadFile(drvPath); !bytes.Equal(d.Unparse(false, nil), raw) {
			t.Errorf("%s does not round-trip", drvPath)
		}
	}
	if checked < 9 {
		t.Fatalf("only %d realisations compared", checked)
	}
}

// BenchmarkChain: the id of the last of a chain of 200 derivations, each
// depending on the one before (cold: every .drv read and hashed once;
// warm: only the top one, the inputs' hashes remembered).
func BenchmarkChain(b *testing.B) {
	files := map[string][]byte{}
	prev := ""
	for i := 0; i < 200; i++ {
		inputs := ""
		if prev != "" {
			inputs = `("` + prev + `",["out"])`
		}
		path := fmt.Sprintf("/nix/store/%032d-c%d.drv", i, i)
		files[path] = []byte(`Derive([("out","","r:sha256","")],[` + inputs + `],[],"x86_64-linux","/bin/sh",["-c","echo ` + strings.Repeat("x", 2000) + ` > $out"],[("name","c"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9")])`)
		prev = path
	}
	read := func(p string) ([]byte, error) { return files[p], nil }
	top, _ := Parse(files[prev])
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			if _, err := (&Hasher{Read: read}).ID(top, "out"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("warm", func(b *testing.B) {
		h := &Hasher{Read: read}
		for b.Loop() {
			if _, err := h.ID(top, "out"); err != nil {
				b.Fatal(err)
			}
		}
	})
}
