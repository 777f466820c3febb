// Command bench measures nixspool on this machine and prints each figure
// beside a baseline measured in the same run, with the ratio. It writes the
// table as JSON (-out) so runs can be compared. Run it with `make bench`.
//
// It needs root, Nix and the MinIO server in .tools/bin (make tools).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
)

// Row is one figure and its same-run baseline.
type Row struct {
	Section  string  `json:"section"`
	Name     string  `json:"name"`
	Value    float64 `json:"value"`
	Unit     string  `json:"unit"`
	Baseline string  `json:"baseline"`
	BaseVal  float64 `json:"baseline_value"`
	Ratio    float64 `json:"ratio"` // value / baseline
	// Faster is baseline / value for times (lower is better), when
	// LowerIsBetter is set: "40×" reads better than a ratio of 0.025.
	LowerIsBetter bool    `json:"lower_is_better,omitempty"`
	Faster        float64 `json:"faster,omitempty"`
	Target        string  `json:"target,omitempty"`
}

// section is one part of the bench, chosen with -only or left out with
// -skip by its name.
type section struct {
	name string
	help string
	run  func(*bench) error
}

// sections are the bench's parts in the order they run. A file that adds
// a section registers it from an init function (see register); it then
// runs after these.
var sections = []section{
	{"hook", "hook wall time and hooks/s against a trivial binary", (*bench).hookLatency},
	{"big", "the Go toolchain path to MinIO against nix copy to file://", (*bench).bigPath},
	{"tiny", "1,000 tiny paths to MinIO against nix copy and MinIO's PUT ceiling", (*bench).tinyPaths},
	{"presence", "presence check of 10,000 paths, cold and cached", (*bench).presence},
	{"rss", "agentd peak RSS with a 1.1 GiB path", (*bench).hugePathRSS},
	{"burst", "RTT: 320 paths queued by 320 hook runs, against stock nix copy over the same link", (*bench).burst},
	{"fanout", "RTT: first push of 1 path + 1,000 × 200 kB incompressible dependencies, 3 runs, peak RSS", (*bench).fanout},
	{"reconcile", "RTT: a fresh agentd pushes a 2,001-path closure the bucket already has", (*bench).reconcile},
	{"memtiny", "peak RSS and time for one closure of 10,000 tiny paths, against nix copy to file://", (*bench).memTiny},
	{"mem5g", "peak RSS for one 5 GB incompressible path (needs ~22 GB free disk)", (*bench).memHuge},
}

// register adds a section defined in another file; call it from init.
func register(name, help string, run func(*bench) error) {
	sections = append(sections, section{name, help, run})
}

var (
	binDir  = flag.String("bin", "bin", "directory with hook, agentd, agentctl")
	outFile = flag.String("out", "bench/results.json", "write the table as JSON here")
	hookN   = flag.Int("hook-runs", 1000, "sequential hook runs")
	tinyN   = flag.Int("tiny", 1000, "tiny paths")
	skip    = flag.String("skip", "", "comma-separated sections to leave out (see -list)")
	only    = flag.String("only", "", "comma-separated sections to run, all others left out (see -list)")
	list    = flag.Bool("list", false, "list the sections and exit")
	rows    []Row
	current string // the section running now
)

func main() {
	flag.Parse()
	if *list {
		for _, s := range sections {
			fmt.Printf("%-10s %s\n", s.name, s.help)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func add(r Row) {
	r.Section = current
	if r.BaseVal != 0 {
		r.Ratio = r.Value / r.BaseVal
		if r.LowerIsBetter && r.Value != 0 {
			r.Faster = r.BaseVal / r.Value
		}
	}
	rows = append(rows, r)
	fmt.Fprintf(os.Stderr, "  %s: %.3g %s (baseline %s: %.3g, ratio %.3g)\n", r.Name, r.Value, r.Unit, r.Baseline, r.BaseVal, r.Ratio)
}

// chosen returns the sections to run, or an error naming unknown ones.
func chosen() ([]section, error) {
	names := map[string]bool{}
	for _, s := range sections {
		names[s.name] = true
	}
	parse := func(flagName, v string) (map[string]bool, error) {
		set := map[string]bool{}
		for _, x := range strings.Split(v, ",") {
			if x = strings.TrimSpace(x); x == "" {
				continue
			}
			if !names[x] {
				return nil, fmt.Errorf("-%s %s: no such section (have: %s)", flagName, x, sectionNames())
			}
			set[x] = true
		}
		return set, nil
	}
	skipSet, err := parse("skip", *skip)
	if err != nil {
		return nil, err
	}
	onlySet, err := parse("only", *only)
	if err != nil {
		return nil, err
	}
	var out []section
	for _, s := range sections {
		if skipSet[s.name] || (len(onlySet) > 0 && !onlySet[s.name]) {
			continue
		}
		out = append(out, s)
	}
	return out, nil
}

func sectionNames() string {
	var n []string
	for _, s := range sections {
		n = append(n, s.name)
	}
	return strings.Join(n, ",")
}

func run() (err error) {
	todo, err := chosen()
	if err != nil {
		return err
	}
	abs, err := filepath.Abs(*binDir)
	if err != nil {
		return err
	}
	*binDir = abs
	work, err := os.MkdirTemp("", "nixspool-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	bt := &benchT{work: work}
	b := &bench{work: work, env: testenv.NixEnv(""), t: bt}
	defer bt.runCleanups()
	defer b.cleanup()
	// A failed section is reported and the others still run.
	var failed []string
	for _, s := range todo {
		current = s.name
		if err := runSection(b, s); err != nil {
			fmt.Fprintf(os.Stderr, "  section %s failed: %v\n", s.name, err)
			failed = append(failed, fmt.Sprintf("%s: %v", s.name, err))
		}
	}
	printTable()
	if len(failed) > 0 {
		err = fmt.Errorf("%d section(s) failed: %s", len(failed), strings.Join(failed, "; "))
	}
	if *outFile != "" {
		data, _ := json.MarshalIndent(map[string]any{"time": time.Now().UTC(), "settings": settings(), "rows": rows, "failed": failed}, "", "  ")
		if err := os.WriteFile(*outFile, append(data, '\n'), 0o644); err != nil {
			return err
		}
		fmt.Printf("\nwritten to %s\n", *outFile)
	}
	return err
}

// runSection runs one section; the test helpers' fatal errors (panics)
// end only that section.
func runSection(b *bench, s section) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	return s.run(b)
}

// settings are the flags that shape the figures, kept with them.
func settings() map[string]string {
	m := map[string]string{}
	flag.VisitAll(func(f *flag.Flag) {
		if f.Name != "out" && f.Name != "bin" && f.Name != "list" {
			m[f.Name] = f.Value.String()
		}
	})
	return m
}

func printTable() {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "figure\tnixspool\tbaseline (same run)\tbaseline\tratio\ttarget\t")
	for _, r := range rows {
		ratio := "-"
		if r.BaseVal != 0 {
			ratio = fmt.Sprintf("%.3g", r.Ratio)
			switch {
			case r.Faster >= 1:
				ratio += fmt.Sprintf(" (%.3g× faster)", r.Faster)
			case r.Faster > 0:
				ratio += fmt.Sprintf(" (%.3g× slower)", 1/r.Faster)
			}
		}
		base := num(r.BaseVal)
		if r.Baseline == "" {
			base = "-"
		}
		fmt.Fprintf(w, "%s\t%s %s\t%s\t%s\t%s\t%s\t\n", r.Name, num(r.Value), r.Unit, r.Baseline, base, ratio, r.Target)
	}
	w.Flush()
}

func num(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case v >= 0.1 || v == 0:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

type bench struct {
	work  string
	env   []string
	procs []*exec.Cmd
	minio *testenv.MinIO
	t     *benchT
	// rttMeasured: the proxy's round trip has been measured (a row).
	rttMeasured bool
}

func (b *bench) cleanup() {
	for _, p := range b.procs {
		p.Process.Kill()
		p.Wait()
	}
}

// agent starts an agentd with the given cache and returns its socket and pid.
func (b *bench) agent(name, cache string, env []string, extra ...string) (string, *exec.Cmd, error) {
	dir := filepath.Join(b.work, name)
	os.MkdirAll(dir, 0o700)
	key := filepath.Join(dir, "secret.key")
	out, err := exec.Command("nix", "--extra-experimental-features", "nix-command", "key", "generate-secret", "--key-name", "bench-1").Output()
	if err != nil {
		return "", nil, fmt.Errorf("generate key: %w", err)
	}
	os.WriteFile(key, out, 0o600)
	sock := filepath.Join(dir, "agentd.sock")
	args := append([]string{"--cache", cache, "--secret-key-file", key, "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--gc-roots", "off", "--log-level", "warn"}, extra...)
	cmd := exec.Command(filepath.Join(*binDir, "agentd"), args...)
	cmd.Env = append(append([]string{}, b.env...), env...)
	logf, _ := os.Create(filepath.Join(dir, "agentd.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	b.procs = append(b.procs, cmd)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpStatus}, time.Second); err == nil {
			return sock, cmd, nil
		}
		if time.Now().After(deadline) {
			return "", nil, fmt.Errorf("agentd did not start; see %s", logf.Name())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func status(sock string) (*protocol.Status, error) {
	resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpStatus}, 10*time.Second)
	if err != nil {
		return nil, err
	}
	return resp.Status, nil
}

// waitUploaded waits until agentd has uploaded n jobs and nothing is queued.
// A status call that fails (agentd too busy to answer within its timeout)
// is retried until the deadline; the slowest answer is reported.
func waitUploaded(sock string, n uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var slowest time.Duration
	failures := 0
	defer func() {
		if slowest > time.Second || failures > 0 {
			fmt.Fprintf(os.Stderr, "  (agentd status: slowest answer %v, %d calls failed)\n", slowest.Round(time.Millisecond), failures)
		}
	}()
	for {
		t0 := time.Now()
		s, err := status(sock)
		slowest = max(slowest, time.Since(t0))
		if err != nil {
			failures++
			var dial *protocol.DialError
			if errors.As(err, &dial) || time.Now().After(deadline) {
				return err
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if s.Failed > 0 {
			return fmt.Errorf("a job failed: %s", s.LastError)
		}
		if s.Uploaded >= n && s.Pending == 0 && s.Uploading == 0 && s.Retrying == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out: %+v", s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func push(sock string, paths []string) error {
	resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpPush, Paths: paths}, time.Minute)
	if err != nil {
		return err
	}
	if !resp.OK {
		return fmt.Errorf("push: %s", resp.Error)
	}
	return nil
}

func nixStoreAdd(env []string, paths ...string) ([]string, error) {
	cmd := exec.Command("nix-store", append([]string{"--add"}, paths...)...)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("nix-store --add: %w", err)
	}
	return strings.Fields(string(out)), nil
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(float64(len(s)-1)*p)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// peakRSS is the peak resident set of a process, in MiB (VmHWM).
func peakRSS(pid int) float64 {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// timeExecs runs cmd n times with concurrency c and returns each run's wall time.
func timeExecs(n, c int, mk func() *exec.Cmd) ([]time.Duration, time.Duration, error) {
	durs := make([]time.Duration, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	next := 0
	start := time.Now()
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= n {
					return
				}
				cmd := mk()
				t0 := time.Now()
				err := cmd.Run()
				durs[i] = time.Since(t0)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("%s: %w", cmd.Path, err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return durs, time.Since(start), firstErr
}
