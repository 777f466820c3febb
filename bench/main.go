// Command bench measures nixspool on this machine and prints each figure
// beside a baseline measured in the same run, with the ratio. It writes the
// table as JSON (-out) so runs can be compared. Run it with `make bench`.
//
// It needs root, Nix and the MinIO server in .tools/bin (make tools).
package main

import (
	"encoding/json"
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
	Name     string  `json:"name"`
	Value    float64 `json:"value"`
	Unit     string  `json:"unit"`
	Baseline string  `json:"baseline"`
	BaseVal  float64 `json:"baseline_value"`
	Ratio    float64 `json:"ratio"` // value / baseline
	Target   string  `json:"target,omitempty"`
}

var (
	binDir  = flag.String("bin", "bin", "directory with hook, agentd, agentctl")
	outFile = flag.String("out", "bench/results.json", "write the table as JSON here")
	hookN   = flag.Int("hook-runs", 1000, "sequential hook runs")
	tinyN   = flag.Int("tiny", 1000, "tiny paths")
	skip    = flag.String("skip", "", "comma-separated sections to skip: hook,big,tiny,presence,rss,gc")
	rows    []Row
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func add(r Row) {
	if r.BaseVal != 0 {
		r.Ratio = r.Value / r.BaseVal
	}
	rows = append(rows, r)
	fmt.Fprintf(os.Stderr, "  %s: %.3g %s (baseline %s: %.3g, ratio %.2f)\n", r.Name, r.Value, r.Unit, r.Baseline, r.BaseVal, r.Ratio)
}

func skipped(s string) bool {
	for _, x := range strings.Split(*skip, ",") {
		if x == s {
			return true
		}
	}
	return false
}

func run() (err error) {
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
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	if !skipped("hook") {
		if err := b.hookLatency(); err != nil {
			return fmt.Errorf("hook: %w", err)
		}
	}
	if !skipped("big") {
		if err := b.bigPath(); err != nil {
			return fmt.Errorf("big path: %w", err)
		}
	}
	if !skipped("tiny") {
		if err := b.tinyPaths(); err != nil {
			return fmt.Errorf("tiny paths: %w", err)
		}
	}
	if !skipped("presence") {
		if err := b.presence(); err != nil {
			return fmt.Errorf("presence: %w", err)
		}
	}
	if !skipped("rss") {
		if err := b.hugePathRSS(); err != nil {
			return fmt.Errorf("rss: %w", err)
		}
	}
	if err := b.gcSection(); err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	printTable()
	if *outFile != "" {
		data, _ := json.MarshalIndent(map[string]any{"time": time.Now().UTC(), "rows": rows}, "", "  ")
		if err := os.WriteFile(*outFile, append(data, '\n'), 0o644); err != nil {
			return err
		}
		fmt.Printf("\nwritten to %s\n", *outFile)
	}
	return nil
}

func printTable() {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "figure\tnixspool\tbaseline (same run)\tbaseline\tratio\ttarget\t")
	for _, r := range rows {
		fmt.Fprintf(w, "%s\t%s %s\t%s\t%s\t%.2f\t%s\t\n", r.Name, num(r.Value), r.Unit, r.Baseline, num(r.BaseVal), r.Ratio, r.Target)
	}
	w.Flush()
}

func num(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

type bench struct {
	work  string
	env   []string
	procs []*exec.Cmd
	minio *testenv.MinIO
	t     *benchT
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
func waitUploaded(sock string, n uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		s, err := status(sock)
		if err != nil {
			return err
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
		time.Sleep(5 * time.Millisecond)
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
