package main

// capture: the store watcher (agentd --capture) over a store of at least
// 20,000 valid paths: what an idle watch cycle costs, and how long a new
// path waits to be queued.

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nixspool/nixspool/internal/storewatch"
	"github.com/nixspool/nixspool/protocol"
)

var (
	captureStore  = flag.Int("capture-store", 20000, "capture: valid paths the store must hold (imported for the run if it has fewer)")
	captureIdle   = flag.Duration("capture-idle", 30*time.Second, "capture: idle time over which the watcher's CPU is measured")
	captureProbes = flag.Int("capture-probes", 10, "capture: new paths whose delay to the queue is measured")
)

func init() {
	register("capture", "store watcher over ≥ 20,000 valid paths: idle CPU and memory against agentd without it, delay from valid to queued", (*bench).capture)
}

func (b *bench) capture() error {
	db, err := storewatch.Open(storewatch.DefaultDir)
	if err != nil {
		return err
	}
	defer db.Close()
	b0, err := db.Read(context.Background(), 0, *captureStore)
	if err != nil {
		return err
	}
	have := len(b0.Paths)
	if have < *captureStore {
		c, err := importClosure(b.env, "capture-"+randHex()[:6], *captureStore-have, 64, false)
		if err != nil {
			return err
		}
		defer deletePaths(b.env, c.All())
		have = *captureStore
	}
	// An unreachable cache: captured jobs stay queued, where the delay
	// is read, and nothing else runs.
	cache := "s3://capture-bench?endpoint=http://127.0.0.1:1&region=us-east-1"
	sockW, cmdW, err := b.agent("capture-all-"+randHex()[:6], cache, nil, "--capture", "all", "--capture-existing=false", "--skip-signed-by=")
	if err != nil {
		return err
	}
	_, cmdH, err := b.agent("capture-hook-"+randHex()[:6], cache, nil)
	if err != nil {
		return err
	}
	time.Sleep(3 * time.Second) // start-up work done
	w0, h0 := cpuTime(cmdW.Process.Pid), cpuTime(cmdH.Process.Pid)
	s0, err := status(sockW)
	if err != nil || s0.Capture == nil || s0.Capture.Error != "" {
		return fmt.Errorf("watcher not running: %v %+v", err, s0)
	}
	t0 := time.Now()
	time.Sleep(*captureIdle)
	wall := time.Since(t0)
	w1, h1 := cpuTime(cmdW.Process.Pid), cpuTime(cmdH.Process.Pid)
	pct := func(d time.Duration) float64 { return 100 * d.Seconds() / wall.Seconds() }
	interval := time.Second
	cycles := wall.Seconds() / interval.Seconds()
	add(Row{Name: fmt.Sprintf("agentd idle CPU with --capture all, %d valid paths", have), Value: pct(w1 - w0), Unit: "% of a core",
		Baseline: "agentd --capture hook, idle", BaseVal: pct(h1 - h0), Target: "< 1%"})
	add(Row{Name: "watch cycle CPU (difference per cycle)", Value: float64(max(w1-w0-(h1-h0), 0).Microseconds()) / cycles, Unit: "µs",
		Baseline: "watch interval", BaseVal: float64(interval.Microseconds()), LowerIsBetter: true})
	add(Row{Name: "agentd RSS with --capture all, idle", Value: rss(cmdW.Process.Pid), Unit: "MiB",
		Baseline: "agentd --capture hook", BaseVal: rss(cmdH.Process.Pid)})

	// Delay from valid (nix-store --add returned) to queued.
	dir := filepath.Join(b.work, "capture-src")
	os.MkdirAll(dir, 0o755)
	var delays []time.Duration
	var added []string
	defer func() { deletePaths(b.env, added) }()
	for i := range *captureProbes {
		f := filepath.Join(dir, fmt.Sprintf("probe-%d-%s", i, randHex()))
		os.WriteFile(f, []byte(randHex()+"\n"), 0o644)
		ps, err := nixStoreAdd(b.env, f)
		if err != nil {
			return err
		}
		start := time.Now()
		added = append(added, ps...)
		for !queued(sockW, ps[0]) {
			if time.Since(start) > 30*time.Second {
				return fmt.Errorf("%s not queued after 30s", ps[0])
			}
			time.Sleep(10 * time.Millisecond)
		}
		delays = append(delays, time.Since(start))
		time.Sleep(time.Duration(i%4) * 250 * time.Millisecond) // spread over the interval
	}
	slices.Sort(delays)
	add(Row{Name: "delay from valid to queued, p50", Value: ms(percentile(delays, 0.5)), Unit: "ms", Baseline: "watch interval", BaseVal: ms(interval), LowerIsBetter: true, Target: "≤ 2 s"})
	add(Row{Name: "delay from valid to queued, max", Value: ms(delays[len(delays)-1]), Unit: "ms", Baseline: "watch interval", BaseVal: ms(interval), LowerIsBetter: true, Target: "≤ 2 s"})
	return nil
}

// queued reports whether path has a job from the watcher.
func queued(sock, path string) bool {
	resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpList, Source: "capture"}, 5*time.Second)
	if err != nil {
		return false
	}
	for _, j := range resp.Jobs {
		if j.Path == path {
			return true
		}
	}
	return false
}

// cpuTime is the CPU time (user + system) a process has used.
func cpuTime(pid int) time.Duration {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces): utime and
	// stime are the 12th and 13th, in clock ticks (100 per second).
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+s) * 10 * time.Millisecond
}

// rss is a process's resident set now, in MiB (VmRSS).
func rss(pid int) float64 {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}
