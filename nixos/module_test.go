// Package nixos tests nixos-module.nix, package.nix and flake.nix: they
// parse with Nix, and, when a nixpkgs lib is available, the module
// evaluates with the real module system to the expected units, socket and
// nix.conf settings, and its assertions fire for bad configurations.
//
// The nixpkgs lib is the directory NIXPKGS_LIB names (nixpkgs' lib/
// directory, e.g. NIXPKGS_LIB=$HOME/src/nixpkgs/lib); when NIXPKGS_LIB is
// unset, an offline copy beside the clone, ../shared/nixpkgs-lib/lib, is
// used if it is there. Without either, the evaluation tests are skipped
// and only parsing is checked.
package nixos

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/internal/testenv"
)

func TestNixFilesParse(t *testing.T) {
	if _, err := exec.LookPath("nix-instantiate"); err != nil {
		testenv.Missing(t, "nix-instantiate")
	}
	for _, f := range []string{"nixos-module.nix", "package.nix", "flake.nix", "nixos/eval.nix"} {
		out, err := exec.Command("nix-instantiate", "--parse", filepath.Join(testenv.RepoRoot(), f)).CombinedOutput()
		if err != nil {
			t.Errorf("%s does not parse: %v\n%s", f, err, out)
		}
	}
}

// nixpkgsLib returns the absolute path of the nixpkgs lib directory to
// evaluate the module with: NIXPKGS_LIB, or else the offline copy at
// <clone>/../shared/nixpkgs-lib/lib. It skips the test when there is none,
// and fails it when NIXPKGS_LIB names something that is not a nixpkgs lib.
func nixpkgsLib(t *testing.T) string {
	t.Helper()
	isLib := func(dir string) bool {
		_, err := os.Stat(filepath.Join(dir, "default.nix"))
		return err == nil
	}
	if dir := os.Getenv("NIXPKGS_LIB"); dir != "" {
		abs, err := filepath.Abs(dir)
		if err != nil || !isLib(abs) {
			t.Fatalf("NIXPKGS_LIB=%s is not a nixpkgs lib directory (no default.nix in it)", dir)
		}
		return abs
	}
	beside := filepath.Join(filepath.Dir(testenv.RepoRoot()), "shared", "nixpkgs-lib", "lib")
	if !isLib(beside) {
		t.Skipf("no nixpkgs lib to evaluate the module with: NIXPKGS_LIB is unset and %s does not exist; "+
			"set NIXPKGS_LIB to nixpkgs' lib directory to run this test", beside)
	}
	return beside
}

type evalResult struct {
	FailedAssertions []string       `json:"failedAssertions"`
	Groups           []string       `json:"groups"`
	Tmpfiles         []string       `json:"tmpfiles"`
	Packages         []string       `json:"packages"`
	Hook             string         `json:"hook"`
	HookText         string         `json:"hookText"`
	Socket           map[string]any `json:"socket"`
	Service          map[string]any `json:"service"`
	GCService        map[string]any `json:"gcService"`
	GCTimer          map[string]any `json:"gcTimer"`
}

func evalModule(t *testing.T, configuration string) evalResult {
	t.Helper()
	libDir := nixpkgsLib(t)
	cfg := filepath.Join(t.TempDir(), "cfg.nix")
	if err := os.WriteFile(cfg, []byte(configuration), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nix-instantiate", "--eval", "--strict", "--json", filepath.Join(testenv.RepoRoot(), "nixos", "eval.nix"),
		"--arg", "lib", "import "+libDir, "--arg", "configuration", "import "+cfg)
	cmd.Env = testenv.NixEnv("")
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("evaluation failed: %v\n%s", err, stderr)
	}
	var r evalResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return r
}

func TestModuleTypicalConfiguration(t *testing.T) {
	r := evalModule(t, `{
  services.nixspool = {
    enable = true;
    cache = "s3://my-cache?endpoint=s3.example.org&region=eu-1";
    secretKeyFiles = [ "/var/lib/secrets/cache-1.key" "/var/lib/secrets/cache-2.key" ];
    credentialsFile = "/var/lib/secrets/s3.env";
    compression = "zstd";
    jobs = 4;
    metrics.listen = "127.0.0.1:9443";
    settings = { max-attempts = 20; log-format = "json"; exclude = [ "-doc$" ]; };
    extraPostBuildHooks = [ { command = "/run/current-system/sw/bin/notify-build"; timeout = "5s"; } ];
  };
}`)
	if len(r.FailedAssertions) != 0 {
		t.Fatalf("assertions failed for a good configuration: %v", r.FailedAssertions)
	}
	script, _ := r.Service["script"].(string)
	for _, want := range []string{
		"/bin/agentd ",
		"--cache 's3://my-cache?endpoint=s3.example.org&region=eu-1&compression=zstd'",
		"--secret-key-file ${CREDENTIALS_DIRECTORY}/secret-key-0",
		"--secret-key-file ${CREDENTIALS_DIRECTORY}/secret-key-1",
		"--gc-roots /nix/var/nix/gcroots/nixspool",
		"--jobs 4",
		"--capture hook",
		"--metrics-listen 127.0.0.1:9443",
		"--max-attempts=20",
		"--exclude='-doc$'",
	} {
		if !strings.Contains(script, want) {
			t.Errorf("service script lacks %q:\n%s", want, script)
		}
	}
	if strings.Contains(script, "--admin-group") {
		t.Errorf("an admin group by default:\n%s", script)
	}
	if strings.Contains(script, "/var/lib/secrets") {
		t.Errorf("key paths leak into argv instead of LoadCredential:\n%s", script)
	}
	sc := r.Service["serviceConfig"].(map[string]any)
	if sc["Type"] != "notify" || sc["ProtectSystem"] != "strict" || sc["NoNewPrivileges"] != true || sc["StateDirectory"] != "nixspool" {
		t.Errorf("serviceConfig = %v", sc)
	}
	creds, _ := json.Marshal(sc["LoadCredential"])
	if !strings.Contains(string(creds), "secret-key-0:/var/lib/secrets/cache-1.key") {
		t.Errorf("LoadCredential = %s", creds)
	}
	env, _ := json.Marshal(sc["EnvironmentFile"])
	if !strings.Contains(string(env), "/var/lib/secrets/s3.env") {
		t.Errorf("EnvironmentFile = %s", env)
	}
	sock := r.Socket["socketConfig"].(map[string]any)
	if sock["ListenStream"] != "/run/nixspool/agentd.sock" || sock["SocketMode"] != "0660" || sock["SocketGroup"] != "nixspool" {
		t.Errorf("socketConfig = %v", sock)
	}
	if !strings.Contains(r.HookText, "NIXSPOOL_SOCKET=/run/nixspool/agentd.sock") || !strings.Contains(r.HookText, "/bin/nixspool-hook") ||
		!strings.Contains(r.HookText, "NIXSPOOL_GC_ROOTS=/nix/var/nix/gcroots/nixspool") ||
		!strings.Contains(r.HookText, "timeout --kill-after=5 5s /run/current-system/sw/bin/notify-build") || !strings.HasSuffix(strings.TrimSpace(r.HookText), "exit 0") {
		t.Errorf("post-build hook script:\n%s", r.HookText)
	}
	if !strings.HasPrefix(r.Hook, "/nix/store/") {
		t.Errorf("post-build-hook = %q, want a store path", r.Hook)
	}
	if len(r.Groups) != 1 || r.Groups[0] != "nixspool" || len(r.Packages) != 1 || len(r.Tmpfiles) != 2 {
		t.Errorf("groups %v, packages %v, tmpfiles %v", r.Groups, r.Packages, r.Tmpfiles)
	}
}

// TestModuleSocketGroupCanReachTheSocket: the group's members must be able
// to reach the 0660 socket, so its directory is 0755 (created so by
// systemd, and corrected by tmpfiles on a running system), not systemd's
// root-only 0750.
func TestModuleSocketGroupCanReachTheSocket(t *testing.T) {
	r := evalModule(t, `{
  services.nixspool = {
    enable = true;
    cache = "s3://cache?endpoint=https://minio.example.org&secret-key=/var/lib/secrets/cache.key";
    socketGroup = "builders";
    gcRoots = false;
  };
}`)
	if len(r.FailedAssertions) != 0 {
		t.Fatalf("a signing key in the cache URL should do: %v", r.FailedAssertions)
	}
	sock := r.Socket["socketConfig"].(map[string]any)
	if sock["SocketMode"] != "0660" || sock["SocketGroup"] != "builders" || sock["SocketUser"] != "root" || sock["DirectoryMode"] != "0755" {
		t.Errorf("socketConfig = %v", sock)
	}
	if len(r.Tmpfiles) != 1 || r.Tmpfiles[0] != "d /run/nixspool 0755 root root -" {
		t.Errorf("tmpfiles = %v", r.Tmpfiles)
	}
	if len(r.Groups) != 0 {
		t.Errorf("created groups %v for a group it does not own", r.Groups)
	}
	// The shipped unit for other distributions agrees.
	unit, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "systemd", "nixspool.socket"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"\nDirectoryMode=0755\n", "\nSocketMode=0660\n"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("systemd/nixspool.socket lacks %q", strings.TrimSpace(want))
		}
	}
}

// TestModuleAdminGroup: adminGroup reaches agentd as --admin-group; the
// socket stays the socket group's.
func TestModuleAdminGroup(t *testing.T) {
	r := evalModule(t, `{
  services.nixspool = {
    enable = true;
    cache = "s3://my-cache?region=eu-1";
    secretKeyFiles = [ "/var/lib/secrets/cache-1.key" ];
    socketGroup = "builders";
    adminGroup = "cache ops";
  };
}`)
	if len(r.FailedAssertions) != 0 {
		t.Fatalf("assertions failed: %v", r.FailedAssertions)
	}
	script, _ := r.Service["script"].(string)
	if !strings.Contains(script, "--admin-group 'cache ops'") {
		t.Errorf("service script lacks --admin-group:\n%s", script)
	}
	if sock := r.Socket["socketConfig"].(map[string]any); sock["SocketGroup"] != "builders" {
		t.Errorf("socketConfig = %v", sock)
	}
}

func TestModuleAssertions(t *testing.T) {
	r := evalModule(t, `{
  services.nixspool = {
    enable = true;
    cache = "http://example.org/cache?compression=xz";
    compression = "zstd";
    secretKeyFiles = [ "/nix/store/11111111111111111111111111111111-key" ];
    credentialsFile = "/nix/store/22222222222222222222222222222222-s3.env";
  };
}`)
	joined := strings.Join(r.FailedAssertions, "\n")
	for _, want := range []string{"must be an s3://", "either in `cache`", "credentialsFile", "secretKeyFiles: /nix/store/1111"} {
		if !strings.Contains(joined, want) {
			t.Errorf("no assertion mentioning %q; got:\n%s", want, joined)
		}
	}
	r = evalModule(t, `{ services.nixspool = { enable = true; cache = "file:///var/cache/nix"; secretKeyFiles = [ ]; }; }`)
	if len(r.FailedAssertions) != 1 || !strings.Contains(r.FailedAssertions[0], "at least one signing key") {
		t.Errorf("empty key list: %v", r.FailedAssertions)
	}
	r = evalModule(t, `{ services.nixspool.enable = false; }`)
	if len(r.FailedAssertions) != 0 || len(r.Packages) != 0 {
		t.Errorf("disabled module did something: %+v", r)
	}
}

// TestModuleGC: services.nixspool.gc gives a timer that runs agentctl gc
// against the agent's socket, and nothing when disabled.
func TestModuleGC(t *testing.T) {
	r := evalModule(t, `{
  services.nixspool = {
    enable = true;
    cache = "s3://my-cache?region=eu-1";
    secretKeyFiles = [ "/var/lib/secrets/cache-1.key" ];
    gc = { enable = true; keepSince = "14d"; grace = "3h"; dates = "Sun 03:00"; };
  };
}`)
	if len(r.FailedAssertions) != 0 {
		t.Fatalf("assertions failed: %v", r.FailedAssertions)
	}
	script, _ := r.GCService["script"].(string)
	if !strings.Contains(script, "/bin/agentctl --socket /run/nixspool/agentd.sock gc --keep-since 14d --grace 3h") {
		t.Errorf("gc service script: %q", script)
	}
	sc, _ := r.GCService["serviceConfig"].(map[string]any)
	if sc["Type"] != "oneshot" || sc["TimeoutStartSec"] != "infinity" {
		t.Errorf("gc serviceConfig = %v", sc)
	}
	if req, _ := json.Marshal(r.GCService["requires"]); !strings.Contains(string(req), "nixspool.socket") {
		t.Errorf("gc service requires %s", req)
	}
	tc, _ := r.GCTimer["timerConfig"].(map[string]any)
	if tc["OnCalendar"] != "Sun 03:00" || tc["Persistent"] != true {
		t.Errorf("gc timer = %v", r.GCTimer)
	}
	if wb, _ := json.Marshal(r.GCTimer["wantedBy"]); !strings.Contains(string(wb), "timers.target") {
		t.Errorf("gc timer wantedBy %s", wb)
	}

	r = evalModule(t, `{ services.nixspool = { enable = true; cache = "file:///var/cache/nix"; secretKeyFiles = [ "/k" ]; }; }`)
	if r.GCService != nil || r.GCTimer != nil {
		t.Errorf("gc units without gc.enable: %v %v", r.GCService, r.GCTimer)
	}
	r = evalModule(t, `{ services.nixspool = { enable = true; cache = "file:///var/cache/nix"; secretKeyFiles = [ "/k" ];
    gc = { enable = true; keepSince = "a month"; }; }; }`)
	if len(r.FailedAssertions) != 1 || !strings.Contains(r.FailedAssertions[0], "services.nixspool.gc") {
		t.Errorf("bad keepSince: %v", r.FailedAssertions)
	}
}

// TestModuleCapture: capture is passed to agentd, lets the service open
// Nix's database (an SQLite reader of a WAL database writes its -shm
// file), and is refused outside its values.
func TestModuleCapture(t *testing.T) {
	r := evalModule(t, `{ services.nixspool = { enable = true; cache = "file:///var/cache/nix"; secretKeyFiles = [ "/k" ]; capture = "local"; }; }`)
	script, _ := r.Service["script"].(string)
	if !strings.Contains(script, "--capture local") {
		t.Errorf("service script lacks --capture local:\n%s", script)
	}
	rw, _ := json.Marshal(r.Service["serviceConfig"].(map[string]any)["ReadWritePaths"])
	if !strings.Contains(string(rw), `"/nix/var/nix/db"`) {
		t.Errorf("capture = local: ReadWritePaths = %s, want the Nix database's directory", rw)
	}
	r = evalModule(t, `{ services.nixspool = { enable = true; cache = "file:///var/cache/nix"; secretKeyFiles = [ "/k" ]; }; }`)
	if rw, _ := json.Marshal(r.Service["serviceConfig"].(map[string]any)["ReadWritePaths"]); strings.Contains(string(rw), "/nix/var/nix/db") {
		t.Errorf("default (hook): ReadWritePaths = %s opens the Nix database", rw)
	}
	libDir := nixpkgsLib(t)
	cfg := filepath.Join(t.TempDir(), "cfg.nix")
	os.WriteFile(cfg, []byte(`{ services.nixspool = { enable = true; cache = "file:///c"; secretKeyFiles = [ "/k" ]; capture = "everything"; }; }`), 0o644)
	out, err := exec.Command("nix-instantiate", "--eval", "--strict", "--json", filepath.Join(testenv.RepoRoot(), "nixos", "eval.nix"),
		"--arg", "lib", "import "+libDir, "--arg", "configuration", "import "+cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "capture") {
		t.Errorf("capture = \"everything\" evaluated (err %v):\n%s", err, out)
	}
}
