package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/storepath"
)

// soakExpr is one round of one builder: a top path relying on the round's
// shared paths (which the other builder's round relies on too) and on an
// older round's shared paths, picked at random, which a collector may be
// deleting right then. One top in four holds a 1.1 MiB blob (the uploader
// looks before uploading such a path, and revives its narinfo if it is
// announced for deletion).
const soakExpr = `
let
  mk = name: deps: extra: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "mkdir -p $out; echo ${name} > $out/name; for d in ${toString deps}; do echo $d >> $out/deps; done; ${extra}" ];
    nonce = "%[1]s";
    PATH = "/usr/bin:/bin";
  };
  base = i: mk "soak-base-${toString i}" [] "";
  shared = i: mk "soak-shared-${toString i}" [ (base i) ] "";
  blob = if %[3]d - (%[3]d / 4) * 4 == 0 then "head -c 1150000 /dev/urandom > $out/blob" else "";
in {
  top = mk "soak-top-%[2]s-%[3]d" [ (shared %[3]d) (shared %[4]d) (mk "soak-own-%[2]s-%[3]d" [] "") ] blob;
}
`

// nixBuildQuiet builds attr of file and returns the output path, or an
// error with Nix's output.
func nixBuildQuiet(env []string, file, attr string) (string, error) {
	cmd := exec.Command("nix-build", file, "--no-out-link", "-A", attr)
	cmd.Env = env
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nix-build %s: %v\n%s", file, err, stderr.String())
	}
	lines := strings.Fields(stdout.String())
	if len(lines) == 0 {
		return "", fmt.Errorf("nix-build %s printed no path", file)
	}
	return lines[len(lines)-1], nil
}

// soakNarinfo is a narinfo as the test reads it.
type soakNarinfo struct {
	path string
	lm   time.Time
	refs []string // hash parts
}

// readNarinfos lists and reads every narinfo in the bucket (listing
// times, millisecond precision).
func readNarinfos(t *testing.T, m *testenv.MinIO) map[string]soakNarinfo {
	t.Helper()
	ctx := context.Background()
	c := m.Client()
	out := map[string]soakNarinfo{}
	for o := range c.ListObjects(ctx, m.Bucket, minio.ListObjectsOptions{}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		h := cachefmt.Keys.NarinfoHash(o.Key)
		if h == "" {
			continue
		}
		obj, err := c.GetObject(ctx, m.Bucket, o.Key, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(obj)
		obj.Close()
		if err != nil {
			t.Fatal(err)
		}
		ni, err := cachefmt.ParseNarInfo(data)
		if err != nil {
			t.Fatalf("%s: %v", o.Key, err)
		}
		n := soakNarinfo{path: ni.StorePath, lm: o.LastModified}
		for _, r := range ni.References {
			if rh := cachefmt.RefHash(r); rh != h {
				n.refs = append(n.refs, rh)
			}
		}
		out[h] = n
	}
	return out
}

// invariantChecker samples the bucket while everything runs: a narinfo
// that exists, in one version, both before and after one of its NAR or
// references is found missing, proves an instant at which the cache was
// broken.
type invariantChecker struct {
	m          *testenv.MinIO
	checked    atomic.Int64
	mu         sync.Mutex
	violations []string
}

func (ic *invariantChecker) version(ctx context.Context, c *minio.Client, key string) (string, bool) {
	for o := range c.ListObjects(ctx, ic.m.Bucket, minio.ListObjectsOptions{Prefix: key}) {
		if o.Err == nil && o.Key == key {
			return o.ETag + "@" + o.LastModified.Format(time.RFC3339Nano), true
		}
	}
	return "", false
}

func (ic *invariantChecker) exists(ctx context.Context, c *minio.Client, key string) bool {
	_, err := c.StatObject(ctx, ic.m.Bucket, key, minio.StatObjectOptions{})
	return err == nil || minio.ToErrorResponse(err).Code != "NoSuchKey"
}

func (ic *invariantChecker) run(stop <-chan struct{}, rng *rand.Rand) {
	ctx := context.Background()
	c := ic.m.Client()
	for {
		select {
		case <-stop:
			return
		case <-time.After(300 * time.Millisecond):
		}
		var keys []string
		for o := range c.ListObjects(ctx, ic.m.Bucket, minio.ListObjectsOptions{}) {
			if o.Err == nil && cachefmt.Keys.NarinfoHash(o.Key) != "" {
				keys = append(keys, o.Key)
			}
		}
		rng.Shuffle(len(keys), func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
		for _, key := range keys[:min(len(keys), 20)] {
			before, ok := ic.version(ctx, c, key)
			if !ok {
				continue
			}
			obj, err := c.GetObject(ctx, ic.m.Bucket, key, minio.GetObjectOptions{})
			if err != nil {
				continue
			}
			data, err := io.ReadAll(obj)
			obj.Close()
			if err != nil {
				continue
			}
			ni, err := cachefmt.ParseNarInfo(data)
			if err != nil {
				continue
			}
			var missing []string
			if !ic.exists(ctx, c, ni.URL) {
				missing = append(missing, ni.URL)
			}
			for _, r := range ni.References {
				if rh := cachefmt.RefHash(r); rh != "" && !ic.exists(ctx, c, rh+".narinfo") {
					missing = append(missing, rh+".narinfo")
				}
			}
			ic.checked.Add(1)
			if len(missing) == 0 {
				continue
			}
			if after, ok := ic.version(ctx, c, key); ok && after == before {
				ic.mu.Lock()
				ic.violations = append(ic.violations, fmt.Sprintf("%s (%s) existed throughout while %v was missing", key, ni.StorePath, missing))
				ic.mu.Unlock()
			}
		}
	}
}

// TestGCSoak: two agentd processes (own keys and state) upload
// overlapping closures built by nix-build through their hooks, all the
// time, while agentd 1 collects the bucket cycle after cycle (grace 4s,
// retention 12s) and is SIGKILLed in the middle of some sweeps. The
// bucket's DeleteObjects requests are slowed so that the kills land
// between delete requests. A checker samples the invariant throughout. At
// the end, after a last cycle: the audit is clean; every narinfo written
// within the retention, and the pinned closure, substitute into a fresh
// store with stock Nix; and everything else is gone.
//
// NIXSPOOL_GC_SOAK=10m runs it longer; NIXSPOOL_GC_SOAK_SEED=N replays a
// seed.
func TestGCSoak(t *testing.T) {
	testenv.RequireNix(t)
	dur := 60 * time.Second
	if v := os.Getenv("NIXSPOOL_GC_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("NIXSPOOL_GC_SOAK=%q: %v", v, err)
		}
		dur = d
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("NIXSPOOL_GC_SOAK_SEED"); v != "" {
		seed, _ = strconv.ParseUint(v, 10, 64)
	}
	t.Logf("seed %d (NIXSPOOL_GC_SOAK_SEED), %s of uploads", seed, dur)
	rng := rand.New(rand.NewPCG(seed, 1))
	const keepSince, grace = "12s", "6s"

	m := testenv.StartMinIO(t)
	proxy := testenv.StartFaultProxy(t, m.Endpoint)
	proxy.DelayFor = 150 * time.Millisecond
	proxy.Decide = func(r *http.Request, n int) testenv.Fault {
		if r.Method == http.MethodPost && r.URL.Query().Has("delete") {
			return testenv.Delay
		}
		return testenv.Pass
	}
	sk1, pk1 := keyPair(t, "e2e-soak-1")
	sk2, pk2 := keyPair(t, "e2e-soak-2")
	flags := []string{"--gc-poll-interval", "200ms", "--jobs", "4"}
	a1 := newAgent(t, m.CacheURLVia(proxy), sk1, m.Env(), flags...)
	a2 := newAgent(t, m.CacheURL(""), sk2, m.Env(), flags...)
	a2.SkipAudit = true // the same bucket; agentd 1's audit covers it
	a1.Start()
	a2.Start()
	nonce := testenv.Unique()
	dir := t.TempDir()

	// A pinned closure, old by the end: it must survive every cycle.
	pinFile := filepath.Join(dir, "pinned.nix")
	os.WriteFile(pinFile, []byte(fmt.Sprintf(soakExpr, nonce, "pinned", 0, 0)), 0o644)
	pinned, err := nixBuildQuiet(testenv.NixEnv(""), pinFile, "top")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := a2.Ctl("pin", "soak-keep", pinned); err != nil {
		t.Fatalf("pin: %v\n%s", err, out)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	// halt stops the builders, the checker and the operator and waits for
	// them; also at cleanup, so that none outlives a failed test (writing
	// into its temporary directory or reporting after it ended).
	var stopOnce sync.Once
	halt := func() {
		stopOnce.Do(func() { close(stop) })
		wg.Wait()
	}
	t.Cleanup(halt)
	var buildErrs atomic.Int64
	var rounds atomic.Int64
	var topsMu sync.Mutex
	tops := []string{pinned}
	builtAt := []time.Time{time.Now()}
	nextRound := []int{1, 1}
	brngs := []*rand.Rand{rand.New(rand.NewPCG(seed, 10)), rand.New(rand.NewPCG(seed, 11))}
	// buildRounds has agent i's builder build rounds until stop is closed
	// or n rounds are built (n > 0).
	buildRounds := func(i int, a *Agent, n int, stop <-chan struct{}) {
		defer wg.Done()
		env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
		for k := 0; n <= 0 || k < n; k++ {
			select {
			case <-stop:
				return
			default:
			}
			r := nextRound[i]
			nextRound[i]++
			f := filepath.Join(dir, fmt.Sprintf("a%d-r%d.nix", i+1, r))
			// Half the time an older round's shared paths that are
			// likely doomed by now but not yet deleted.
			old := brngs[i].IntN(r)
			if brngs[i].IntN(2) == 0 && r > 8 {
				old = r - 4 - brngs[i].IntN(5)
			}
			os.WriteFile(f, []byte(fmt.Sprintf(soakExpr, nonce, fmt.Sprintf("a%d", i+1), r, old)), 0o644)
			top, err := nixBuildQuiet(env, f, "top")
			if err != nil {
				t.Errorf("builder %d: %v", i+1, err)
				buildErrs.Add(1)
				return
			}
			topsMu.Lock()
			tops = append(tops, top)
			builtAt = append(builtAt, time.Now())
			topsMu.Unlock()
			rounds.Add(1)
		}
	}
	for i, a := range []*Agent{a1, a2} {
		wg.Add(1)
		go buildRounds(i, a, 0, stop)
	}
	checker := &invariantChecker{m: m}
	wg.Add(1)
	go func() { defer wg.Done(); checker.run(stop, rand.New(rand.NewPCG(seed, 3))) }()
	// An operator pushes old tops again now and then: they are recent
	// again, revived if a cycle has announced them, uploaded again if one
	// deleted them.
	var pushes atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		prng := rand.New(rand.NewPCG(seed, 4))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(500+prng.IntN(1000)) * time.Millisecond):
			}
			// Mostly a top just past the retention: likely announced
			// by now, not yet deleted.
			topsMu.Lock()
			var likely []string
			for i, at := range builtAt {
				if age := time.Since(at); age > 12*time.Second && age < 30*time.Second {
					likely = append(likely, tops[i])
				}
			}
			top := tops[prng.IntN(len(tops))]
			if len(likely) > 0 && prng.IntN(4) > 0 {
				top = likely[prng.IntN(len(likely))]
			}
			topsMu.Unlock()
			a := []*Agent{a1, a2}[prng.IntN(2)]
			if _, err := a.Ctl("push", top); err == nil {
				pushes.Add(1)
			} // a1 may be down (killed): then the push is simply lost
		}
	}()

	// The collector, cycle after cycle, a moment apart; every other cycle
	// that begins deleting is killed then.
	var cycles, completed, killed, deleting int
	var deleted, revived int
	deadline := time.Now().Add(dur)
	for time.Now().Before(deadline) && buildErrs.Load() == 0 {
		time.Sleep(time.Duration(rng.IntN(2000)) * time.Millisecond)
		cycles++
		cmd := exec.Command(bin("agentctl"), "--socket", a1.Socket, "gc", "--json", "--keep-since", keepSince, "--grace", grace)
		var stdout strings.Builder
		cmd.Stdout = &stdout
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var stderrText strings.Builder
		didKill := false
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			stderrText.WriteString(sc.Text() + "\n")
			if !didKill && sc.Text() == "gc: "+cachegc.StageDelete {
				deleting++
				if deleting%2 == 0 {
					continue
				}
				time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
				a1.Kill()
				didKill = true
			}
		}
		err := cmd.Wait()
		if didKill {
			killed++
			a1.Start()
			continue
		}
		if err != nil {
			t.Fatalf("gc cycle %d failed: %v\n%s%s", cycles, err, stdout.String(), stderrText.String())
		}
		rep := decodeReport(t, stdout.String())
		completed++
		deleted += rep.Deleted.Narinfos
		revived += rep.Revived
	}
	halt()
	if buildErrs.Load() > 0 {
		t.FailNow()
	}
	if killed == 0 {
		t.Errorf("no cycle was killed while deleting (%d cycles)", cycles)
	}
	for _, a := range []*Agent{a1, a2} {
		if s := a.WaitDrained(3 * time.Minute); s.Failed != 0 {
			t.Fatalf("%d jobs failed: %+v", s.Failed, s)
		}
	}
	checker.mu.Lock()
	violations := checker.violations
	checker.mu.Unlock()
	if len(violations) > 0 {
		t.Fatalf("the invariant broke while the soak ran:\n%s", strings.Join(violations, "\n"))
	}

	// A few more rounds, now that no cycle holds uploads back, then a last
	// cycle with nothing uploading: its outcome is predictable. Its
	// retention covers the last rounds, not the first ones.
	for i, a := range []*Agent{a1, a2} {
		wg.Add(1)
		go buildRounds(i, a, 2, nil)
	}
	wg.Wait()
	for _, a := range []*Agent{a1, a2} {
		a.WaitDrained(3 * time.Minute)
	}
	const lastKeepSince = "30s"
	pre := readNarinfos(t, m)
	rep, _ := gcReport(t, a1, true, "--keep-since", lastKeepSince, "--grace", grace)
	ks, _ := time.ParseDuration(lastKeepSince)
	cutoff := rep.MarkTime.Add(-ks)
	var roots []string
	rootPaths := []string{pinned}
	for h, n := range pre {
		if !n.lm.Before(cutoff) {
			roots = append(roots, h)
			rootPaths = append(rootPaths, n.path)
		}
	}
	roots = append(roots, storepath.HashPart(pinned))
	live := map[string]bool{}
	for len(roots) > 0 {
		h := roots[len(roots)-1]
		roots = roots[:len(roots)-1]
		if live[h] {
			continue
		}
		if _, ok := pre[h]; !ok {
			t.Fatalf("%s is reachable but has no narinfo", h)
		}
		live[h] = true
		roots = append(roots, pre[h].refs...)
	}
	post := readNarinfos(t, m)
	expected := 0
	for h, n := range pre {
		_, there := post[h]
		switch {
		case live[h] && !there:
			t.Errorf("%s (written %s, cutoff %s) was deleted although it is live", n.path, n.lm.Format(time.StampMilli), cutoff.Format(time.StampMilli))
		case !live[h] && there:
			t.Errorf("%s (written %s) is older than the retention, unpinned and unreferenced, yet still there", n.path, n.lm.Format(time.StampMilli))
		case !live[h]:
			expected++
		}
	}
	if rep.Deleted.Narinfos != expected {
		t.Errorf("the last cycle deleted %d narinfos; %d were expected to go", rep.Deleted.Narinfos, expected)
	}
	// Every path the soak built that is not live is gone, whichever cycle
	// took it.
	universe := map[string]bool{}
	for _, top := range tops {
		for _, p := range closureOf(t, top) {
			universe[p] = true
		}
	}
	gone := 0
	for p := range universe {
		h := storepath.HashPart(p)
		_, there := post[h]
		switch {
		case live[h] && !there:
			t.Errorf("%s is live but not in the cache", p)
		case !live[h] && there:
			t.Errorf("%s is neither recent, pinned nor needed, yet still in the cache", p)
		case !live[h]:
			gone++
		}
	}
	if gone == 0 {
		t.Errorf("none of the %d paths built was collected", len(universe))
	}
	// Stock Nix substitutes every closure written within the retention
	// and the pinned one into a fresh store, and they verify.
	fresh := filepath.Join(t.TempDir(), "fresh")
	keys := pk1 + " " + pk2
	env := testenv.NixEnv("")
	testenv.Run(t, env, "nix", append([]string{"copy", "--from", m.HTTPURL(), "--to", fresh, "--trusted-public-keys", keys}, rootPaths...)...)
	if out, err := testenv.Output(env, "nix", append([]string{"store", "verify", "--store", fresh, "--no-trust", "-r"}, rootPaths...)...); err != nil {
		t.Fatalf("substituted closures do not verify: %v\n%s", err, out)
	}
	if out, err := a1.Ctl("audit", "--trusted-public-keys", keys); err != nil {
		t.Fatalf("agentctl audit: %v\n%s", err, out)
	}
	logs := a1.log.String() + a2.log.String()
	t.Logf("%d builds, %d pushes of old tops, %d gc cycles (%d complete, %d killed while deleting), %d narinfos deleted and %d kept for fresh roots during the soak; "+
		"uploads held back %d times (%d of them finding a path deleted), %d top narinfos revived; invariant sampled %d times; "+
		"last cycle: %d roots of %d narinfos, %d deleted; of the %d paths built, %d unpinned old ones are gone",
		rounds.Load(), pushes.Load(), cycles, completed, killed, deleted, revived,
		strings.Count(logs, "by garbage collection (cycle"), strings.Count(logs, "was deleted by garbage collection"), strings.Count(logs, "narinfo revived"),
		checker.checked.Load(), len(rootPaths)-1, len(pre), rep.Deleted.Narinfos, len(universe), gone)
}

func decodeReport(t *testing.T, s string) *cachegc.Report {
	t.Helper()
	var rep cachegc.Report
	if err := json.Unmarshal([]byte(s), &rep); err != nil {
		t.Fatalf("gc report: %v\n%s", err, s)
	}
	return &rep
}
