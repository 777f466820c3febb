package hook

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/nixroots"
	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/statedir"
	"github.com/nixspool/nixspool/internal/testenv"
)

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestSpoolsWhenAgentdIsDown(t *testing.T) {
	dir := t.TempDir()
	out1 := filepath.Join(dir, "out1")
	os.WriteFile(out1, nil, 0o644)
	var stderr bytes.Buffer
	env := map[string]string{
		"OUT_PATHS":          out1 + " " + filepath.Join(dir, "missing"),
		"NIXSPOOL_SOCKET":    filepath.Join(dir, "none.sock"),
		"NIXSPOOL_STATE_DIR": dir,
		"NIXSPOOL_TIMEOUT":   "300ms",
	}
	if code := Run(envOf(env), &stderr); code != 0 {
		t.Fatalf("exit %d, want 0 (never fail the build)", code)
	}
	if !strings.Contains(stderr.String(), "spooled to") || strings.Count(stderr.String(), "\n") != 1 {
		t.Fatalf("stderr = %q, want one line saying where it spooled", stderr.String())
	}
	files, _ := spool.Files(filepath.Join(dir, "spool"))
	if len(files) != 1 {
		t.Fatalf("spool files = %v", files)
	}
	e, err := spool.Read(files[0])
	if err != nil || len(e.Paths) != 1 || e.Paths[0] != out1 {
		t.Fatalf("spooled %+v, %v; want only the existing output", e, err)
	}

	env["NIXSPOOL_STRICT"] = "1"
	if code := Run(envOf(env), &stderr); code == 0 {
		t.Fatal("strict mode exited 0 with agentd down")
	}
}

func TestUnwritableSpoolStillExitsZero(t *testing.T) {
	dir := t.TempDir()
	out1 := filepath.Join(dir, "out1")
	os.WriteFile(out1, nil, 0o644)
	blocker := filepath.Join(dir, "file")
	os.WriteFile(blocker, nil, 0o644) // state dir "below" a file cannot be created
	var stderr bytes.Buffer
	code := Run(envOf(map[string]string{
		"OUT_PATHS": out1, "NIXSPOOL_SOCKET": filepath.Join(dir, "none.sock"),
		"NIXSPOOL_STATE_DIR": filepath.Join(blocker, "state"),
	}), &stderr)
	if code != 0 || !strings.Contains(stderr.String(), "NOT queued") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}

func TestNothingToDo(t *testing.T) {
	var stderr bytes.Buffer
	if code := Run(envOf(map[string]string{}), &stderr); code != 0 || stderr.Len() != 0 {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	if code := Run(envOf(map[string]string{"DRV_PATH": "/nonexistent.drv"}), &stderr); code != 0 || !strings.Contains(stderr.String(), "read derivation") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}

func TestConfig(t *testing.T) {
	c, err := ConfigFromEnv(envOf(map[string]string{}))
	if err != nil || c.Socket != DefaultSocket || c.StateDir != DefaultStateDir || c.Timeout != DefaultTimeout || c.Strict {
		t.Fatalf("defaults = %+v, %v", c, err)
	}
	c, err = ConfigFromEnv(envOf(map[string]string{"NIXSPOOL_TIMEOUT": "150ms"}))
	if err != nil || c.Timeout != 150*time.Millisecond {
		t.Fatalf("timeout = %v, %v", c.Timeout, err)
	}
	if _, err := ConfigFromEnv(envOf(map[string]string{"NIXSPOOL_TIMEOUT": "soon"})); err == nil {
		t.Fatal("bad timeout accepted")
	}
}

// TestOutputsOfEveryDerivationKind: the outputs come from the .drv for
// input-addressed outputs; a multi-output floating content-addressed
// derivation and a deferred one (depends on floating outputs) have
// outputs without a path, reported as floating for agentd to resolve.
func TestOutputsOfEveryDerivationKind(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	os.WriteFile(out, nil, 0o644)
	for name, tc := range map[string]struct {
		drv      string
		paths    []string
		floating bool
	}{
		"input-addressed":         {`Derive([("dev","` + dir + `/gone","",""),("out","` + out + `","","")],[],[],"x86_64-linux","/bin/sh",[],[("name","x")])`, []string{out}, false},
		"multi-output floating":   {`Derive([("dev","","r:sha256",""),("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[("name","x")])`, nil, true},
		"deferred":                {`Derive([("out","","","")],[("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv",["out"])],[],"x86_64-linux","/bin/sh",[],[("name","x")])`, nil, true},
		"floating, OUT_PATHS set": {`Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[("name","x")])`, []string{out}, true},
	} {
		f := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".drv")
		os.WriteFile(f, []byte(tc.drv), 0o644)
		outPaths := ""
		if strings.Contains(name, "OUT_PATHS") {
			outPaths = out
		}
		paths, floating, err := Outputs(outPaths, f)
		if err != nil || floating != tc.floating || strings.Join(paths, " ") != strings.Join(tc.paths, " ") {
			t.Errorf("%s: Outputs = %v, %v, %v; want %v, %v", name, paths, floating, err, tc.paths, tc.floating)
		}
	}
	if _, _, err := Outputs("", filepath.Join(dir, "missing.drv")); err == nil {
		t.Error("no error for a missing derivation")
	}
}

// aStorePath adds a small path to the real Nix store (the hook only roots
// store paths that exist) and deletes it at cleanup.
func aStorePath(t *testing.T) string {
	t.Helper()
	testenv.RequireNix(t)
	return testenv.AddRandomPath(t, "hook-test", 64)
}

// TestRootsWhatItSpools: with agentd down, the spooled store paths are GC
// roots in NIXSPOOL_GC_ROOTS (named as agentd names its roots), so that a
// collection before agentd imports the spool cannot delete them.
func TestRootsWhatItSpools(t *testing.T) {
	dir := t.TempDir()
	p := aStorePath(t)
	roots := filepath.Join(dir, "gcroots", "nixspool")
	env := map[string]string{
		"OUT_PATHS":          p,
		"NIXSPOOL_SOCKET":    filepath.Join(dir, "none.sock"),
		"NIXSPOOL_STATE_DIR": dir,
		"NIXSPOOL_TIMEOUT":   "300ms",
		"NIXSPOOL_GC_ROOTS":  roots,
	}
	var stderr bytes.Buffer
	if code := Run(envOf(env), &stderr); code != 0 || !strings.Contains(stderr.String(), "spooled to") || strings.Count(stderr.String(), "\n") != 1 {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	if got, err := os.Readlink(filepath.Join(roots, filepath.Base(p))); err != nil || got != p {
		t.Fatalf("root = %q, %v; want a symlink to %s", got, err, p)
	}

	off := t.TempDir()
	env["NIXSPOOL_STATE_DIR"], env["NIXSPOOL_GC_ROOTS"] = off, "off"
	stderr.Reset()
	if code := Run(envOf(env), &stderr); code != 0 {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	if ents, _ := os.ReadDir(roots); len(ents) != 1 {
		t.Fatalf("NIXSPOOL_GC_ROOTS=off made roots: %v", ents)
	}
}

func TestGCRootsConfig(t *testing.T) {
	for _, c := range []struct {
		env, want string
		warn      bool
	}{
		{"", DefaultGCRoots, false},
		{"off", "", false},
		{"/nix/var/nix/gcroots/other/", "/nix/var/nix/gcroots/other", false},
		{"relative/dir", "", true},
	} {
		cfg, err := ConfigFromEnv(envOf(map[string]string{"NIXSPOOL_GC_ROOTS": c.env}))
		if err != nil || cfg.GCRoots != c.want || (len(cfg.Warnings) > 0) != c.warn {
			t.Errorf("NIXSPOOL_GC_ROOTS=%q: roots %q, warnings %v, err %v; want %q", c.env, cfg.GCRoots, cfg.Warnings, err, c.want)
		}
	}
}

// TestRootsWhereAgentdRecorded: without NIXSPOOL_GC_ROOTS the hook roots
// what it spools in the directory agentd recorded in its state directory
// (its --gc-roots), and nowhere when agentd keeps no roots.
func TestRootsWhereAgentdRecorded(t *testing.T) {
	if got := RecordedRoots(t.TempDir(), "/default"); got != "/default" {
		t.Fatalf("nothing recorded: %q", got)
	}
	dir := t.TempDir()
	os.WriteFile(statedir.Dir(dir).Roots(), []byte("/nix/var/nix/gcroots/custom\n"), 0o644)
	if got := RecordedRoots(dir, "/default"); got != "/nix/var/nix/gcroots/custom" {
		t.Fatalf("recorded directory: %q", got)
	}
	os.WriteFile(statedir.Dir(dir).Roots(), []byte("off\n"), 0o644)
	if got := RecordedRoots(dir, "/default"); got != "" {
		t.Fatalf("recorded off: %q", got)
	}
	p := aStorePath(t)
	roots := filepath.Join(t.TempDir(), "roots")
	os.WriteFile(statedir.Dir(dir).Roots(), []byte(roots+"\n"), 0o644)
	env := map[string]string{"OUT_PATHS": p, "NIXSPOOL_SOCKET": filepath.Join(dir, "none.sock"), "NIXSPOOL_STATE_DIR": dir, "NIXSPOOL_TIMEOUT": "300ms"}
	var stderr bytes.Buffer
	if code := Run(envOf(env), &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if got, err := os.Readlink(filepath.Join(roots, filepath.Base(p))); err != nil || got != p {
		t.Fatalf("root = %q, %v; want it in the recorded directory", got, err)
	}
}

// TestSpoolsUnderTheRootsLock: the hook roots and spools under the roots
// directory's lock, shared: while agentd holds it exclusively (to decide
// which roots to remove) the hook waits, and spools once it is released.
func TestSpoolsUnderTheRootsLock(t *testing.T) {
	dir := t.TempDir()
	p := aStorePath(t)
	roots := filepath.Join(dir, "gcroots", "nixspool")
	r, err := nixroots.New(roots)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := r.Lock(true, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"OUT_PATHS":          p,
		"NIXSPOOL_SOCKET":    filepath.Join(dir, "none.sock"),
		"NIXSPOOL_STATE_DIR": dir,
		"NIXSPOOL_TIMEOUT":   "5s",
		"NIXSPOOL_GC_ROOTS":  roots,
	}
	var stderr bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(envOf(env), &stderr) }()
	time.Sleep(300 * time.Millisecond)
	_, rerr := os.Lstat(filepath.Join(roots, filepath.Base(p)))
	files, _ := spool.Files(filepath.Join(dir, "spool"))
	unlock()
	if rerr == nil || len(files) != 0 {
		<-done
		t.Fatalf("the hook rooted (%v) or spooled (%v) while agentd held the roots lock", rerr == nil, files)
	}
	if code := <-done; code != 0 || !strings.Contains(stderr.String(), "spooled to") || strings.Contains(stderr.String(), "without the roots lock") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	if _, err := os.Lstat(filepath.Join(roots, filepath.Base(p))); err != nil {
		t.Fatalf("not rooted: %v", err)
	}
}
