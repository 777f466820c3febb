package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

// TestHTTPCache uploads to an HTTP binary cache as Nix writes one: nginx's
// DAV module accepting PUT, addressed by the URL a `nix copy --to` user
// pastes (http://…?compression=zstd&secret-key=…). The hook queues a real
// build, agentd uploads with PUTs (presence by HEAD, create-only writes by
// HEAD first since nginx ignores If-None-Match), and stock Nix verifies the
// cache over HTTP and substitutes the closure into a fresh store. What
// needs a listing (gc, the audit) refuses in one line; the closing audit
// reads the directory nginx serves, through file://. Writes need a login
// (basic authentication), which agentd reads from --netrc-file.
func TestHTTPCache(t *testing.T) {
	testenv.RequireNix(t)
	const password = "pw-4c1d9e"
	n := testenv.StartNginx(t, "uploader:"+password)
	netrc := filepath.Join(t.TempDir(), "netrc")
	if err := os.WriteFile(netrc, []byte("machine 127.0.0.1 login uploader password "+password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sk, pk := keyPair(t, "e2e-http-1")
	base := n.URL + "/cache"
	cache := base + "?compression=zstd&secret-key=" + sk + "&write-nar-listing=1"
	a := newAgent(t, cache, sk, nil, "--netrc-file", netrc)
	a.args = withoutFlag(a.args, "--secret-key-file")
	a.SkipAudit = true // audited below, through the directory
	a.Start()

	g := testenv.WriteGraph(t, t.TempDir(), true)
	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), g)
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 || s.Uploaded != testenv.GraphPaths {
		t.Fatalf("status = %+v, want %d uploaded and none failed", s, testenv.GraphPaths)
	}
	verifyCache(t, base, pk, top)

	dir := filepath.Join(n.Root, "cache")
	if _, err := os.Stat(filepath.Join(dir, "nix-cache-info")); err != nil {
		t.Fatalf("nix-cache-info is not in the served directory: %v", err)
	}
	nars, _ := filepath.Glob(filepath.Join(dir, "nar", "*.nar.zst"))
	if len(nars) != testenv.GraphPaths {
		t.Errorf("%d zstd NARs in the served directory, want %d", len(nars), testenv.GraphPaths)
	}
	puts := 0
	for _, line := range n.Requests() {
		if strings.Contains(line, `"PUT /cache/`) {
			puts++
		}
	}
	if puts < 2*testenv.GraphPaths {
		t.Errorf("nginx logged %d PUTs, want at least a NAR and a narinfo per path (%d)", puts, 2*testenv.GraphPaths)
	}
	logs := a.log.String()
	if !strings.Contains(logs, "does not honour create-only writes") {
		t.Errorf("agentd did not find out that nginx ignores If-None-Match:\n%s", logs)
	}
	if strings.Contains(logs, password) {
		t.Error("the netrc password appears in agentd's log")
	}
	if strings.Contains(logs, "asking about paths one by one") {
		t.Errorf("agentd tried to list the HTTP cache for presence:\n%s", logs)
	}

	// What needs a listing refuses, in one line saying why.
	for _, args := range [][]string{{"gc", "--keep-since", "1d", "--grace", "1h"}, {"audit"}} {
		out, err := a.Ctl(args...)
		out = strings.TrimSpace(out)
		if err == nil || !strings.Contains(out, "cannot be listed (an HTTP binary cache has no listing request)") || strings.Count(out, "\n") > 0 {
			t.Errorf("agentctl %s = %v, %q; want a one-line refusal naming why", args[0], err, out)
		}
	}
	cmd := exec.Command(bin("agentd"), "audit", "--cache", base)
	cmd.Env = testenv.NixEnv("")
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cannot be listed (an HTTP binary cache has no listing request)") {
		t.Errorf("agentd audit --cache %s = %v, %q; want a refusal naming why", base, err, out)
	}
	out2, err := a.Ctl("doctor")
	if !strings.Contains(out2, "gc store checks") || !strings.Contains(out2, "not applicable") {
		t.Errorf("doctor: %v\n%s", err, out2)
	}
	a.Stop()

	// nginx serves a plain directory: auditing it as file:// is a
	// whole-cache audit of what the HTTP cache serves.
	rep := auditCache(t, "file://"+dir, testenv.NixEnv(""))
	if rep.Narinfos != testenv.GraphPaths {
		t.Errorf("the audit found %d narinfos, want %d", rep.Narinfos, testenv.GraphPaths)
	}
}
