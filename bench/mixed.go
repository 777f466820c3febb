package main

// mixed: what a team feels while a large path uploads over a modest link:
// small builds finishing meanwhile must reach the cache about as fast as on
// an idle link, and the large path must keep its bandwidth.

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/testenv"
)

var (
	mixedBigMB  = flag.Int("mixed-big-mb", 2000, "mixed: size of the large path in MB")
	mixedSmalls = flag.Int("mixed-smalls", 200, "mixed: small paths (100 kB each) finishing while it uploads")
	mixedSpread = flag.Duration("mixed-spread", 20*time.Second, "mixed: the small paths finish evenly over this time")
)

func init() {
	register("mixed", "50 ms RTT, 20 MB/s: time to cache of 200 small paths finishing while a 2 GB path uploads, against the idle link; the large path's throughput against its solo run", (*bench).mixed)
}

// mixedRun is one run's outcome.
type mixedRun struct {
	small      []time.Duration // each small path: from its push's answer to its narinfo visible
	bigSeconds float64         // the large path: from its push to its narinfo visible
	// windowRate is what the large upload sent per second (bytes) from
	// 20 MB sent on for -mixed-spread: while the small paths are pushed,
	// or the same stretch of a solo run.
	windowRate float64
}

func (b *bench) mixed() error {
	const rtt, rate = 50 * time.Millisecond, 20e6
	fmt.Fprintf(os.Stderr, "mixed: one %d MB path and %d × 100 kB paths over %v RTT, %.0f MB/s\n", *mixedBigMB, *mixedSmalls, rtt, rate/1e6)
	dir := filepath.Join(b.work, "mixed-src")
	os.MkdirAll(dir, 0o755)
	bigSrc := filepath.Join(dir, "big-"+randHex())
	if err := writeRandomFile(bigSrc, int64(*mixedBigMB)*1_000_000); err != nil {
		return err
	}
	files := []string{bigSrc}
	for i := range *mixedSmalls {
		f := filepath.Join(dir, fmt.Sprintf("small-%d-%s", i, randHex()))
		if err := writeRandomFile(f, 100_000); err != nil {
			return err
		}
		files = append(files, f)
	}
	paths, err := nixStoreAdd(b.env, files...)
	os.RemoveAll(dir)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, paths)
	big, smalls := paths[0], paths[1:]
	bigNAR, err := narSize(b.env, big)
	if err != nil {
		return err
	}
	m := b.startDistantMinIO(2*int64(bigNAR) + int64(len(smalls))<<20)
	p := testenv.StartDelayProxy(b.t, m.Endpoint, rtt/2, int64(rate))
	defer p.Close()

	idle, err := b.mixedRun(m, p, "", smalls)
	if err != nil {
		return fmt.Errorf("idle run: %w", err)
	}
	solo, err := b.mixedRun(m, p, big, nil)
	if err != nil {
		return fmt.Errorf("solo run: %w", err)
	}
	busy, err := b.mixedRun(m, p, big, smalls)
	if err != nil {
		return fmt.Errorf("mixed run: %w", err)
	}
	fmt.Fprintf(os.Stderr, "  small paths' time to cache in push order (ms), under load: %v\n", msList(busy.small))
	label := fmt.Sprintf("%d × 100 kB paths finishing over %v while a %d MB path uploads (%v RTT, 20 MB/s): time to cache", len(smalls), *mixedSpread, *mixedBigMB, rtt)
	add(Row{Name: label + " p50", Value: ms(percentile(busy.small, 0.5)), Unit: "ms", Baseline: "same paths, idle link, p50", BaseVal: ms(percentile(idle.small, 0.5))})
	add(Row{Name: label + " p99", Value: ms(percentile(busy.small, 0.99)), Unit: "ms", Baseline: "same paths, idle link, p99", BaseVal: ms(percentile(idle.small, 0.99)), Target: "≤ 2× idle"})
	mbps := func(s float64) float64 { return float64(bigNAR) / 1e6 / s }
	add(Row{Name: fmt.Sprintf("the %d MB path's throughput while the small paths are pushed (%v from 20 MB sent)", *mixedBigMB, *mixedSpread), Value: busy.windowRate / 1e6, Unit: "MB/s", Baseline: "the same stretch of its solo run", BaseVal: solo.windowRate / 1e6, Target: "≥ 0.9×"})
	add(Row{Name: fmt.Sprintf("the %d MB path's throughput over its whole upload, small paths pushed meanwhile", *mixedBigMB), Value: mbps(busy.bigSeconds), Unit: "MB/s", Baseline: "its solo run", BaseVal: mbps(solo.bigSeconds)})
	return nil
}

// mixedRun starts a fresh agentd on a fresh bucket behind the proxy, pushes
// big (if any) and, once 20 MB of it are sent, the small paths one at a time
// spread over -mixed-spread, and waits until every narinfo is visible.
func (b *bench) mixedRun(m *testenv.MinIO, p *testenv.DelayProxy, big string, smalls []string) (mixedRun, error) {
	var out mixedRun
	syscall.Sync() // nothing of the run before is left to be written back during this one
	name := b.bucketName()
	m.MakeBucket(name)
	sock, cmdA, err := b.agent("mixed-"+randHex()[:6], m.BucketURLVia(p.Endpoint, name, ""), m.Env())
	if err != nil {
		return out, err
	}
	defer stop(cmdA)
	if err := b.ensureCacheInfo(sock); err != nil {
		return out, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	// Visibility is watched on MinIO directly, not through the link.
	watch := newVisibility(b.clientOf(m, m.Endpoint), name)
	go watch.run(ctx)

	var bigDone <-chan time.Time
	var bigStart time.Time
	var window *sentWindow // what the large upload sends while the small paths are pushed
	if big != "" {
		bigStart = time.Now()
		sentBefore := p.BytesUp.Load()
		if err := push(sock, []string{big}); err != nil {
			return out, err
		}
		bigDone = watch.add(big)
		if err := waitBytesSent(p, sentBefore, 20_000_000); err != nil {
			return out, err
		}
		window = startWindow(p)
		if smalls == nil {
			time.Sleep(*mixedSpread) // the stretch the small paths take in the mixed run
		}
	}
	type pending struct {
		acked time.Time
		seen  <-chan time.Time
	}
	var waits []pending
	for i, s := range smalls {
		due := time.Now()
		if i > 0 {
			due = time.Now().Add(*mixedSpread / time.Duration(len(smalls)))
		}
		time.Sleep(time.Until(due))
		if err := push(sock, []string{s}); err != nil {
			return out, err
		}
		waits = append(waits, pending{time.Now(), watch.add(s)})
	}
	if window != nil {
		out.windowRate = window.rate()
	}
	for _, w := range waits {
		select {
		case at := <-w.seen:
			out.small = append(out.small, at.Sub(w.acked))
		case <-ctx.Done():
			return out, fmt.Errorf("small paths not visible: %w", ctx.Err())
		}
	}
	if big != "" {
		if smalls != nil {
			if s, err := status(sock); err == nil && s.Pending+s.Uploading == 0 {
				return out, fmt.Errorf("the large path was done before the small ones: nothing was measured under load")
			}
		}
		select {
		case at := <-bigDone:
			out.bigSeconds = at.Sub(bigStart).Seconds()
		case <-ctx.Done():
			return out, fmt.Errorf("the large path is not visible: %w", ctx.Err())
		}
	}
	return out, nil
}

// sentWindow measures what the large upload sends through the proxy over
// a stretch: the bytes carried toward the store, less the bodies of the
// other requests (the small paths'; only the large upload sends parts).
type sentWindow struct {
	p     *testenv.DelayProxy
	start time.Time
	up    int64
	reqs  int
}

func startWindow(p *testenv.DelayProxy) *sentWindow {
	return &sentWindow{p: p, start: time.Now(), up: p.BytesUp.Load(), reqs: len(p.Requests())}
}

// rate returns the large upload's bytes per second since the window started.
func (w *sentWindow) rate() float64 {
	up := w.p.BytesUp.Load() - w.up
	for _, r := range w.p.Requests()[w.reqs:] {
		if !strings.Contains(r.Query, "partNumber=") {
			up -= r.BodyBytes
		}
	}
	return float64(up) / time.Since(w.start).Seconds()
}

// waitBytesSent waits until n bytes more than from have gone through the
// proxy toward the store: a large upload is under way on the link. (Its
// NAR is compressed to a file first, which agentd's progress counts, and
// nothing is sent meanwhile.)
func waitBytesSent(p *testenv.DelayProxy, from, n int64) error {
	deadline := time.Now().Add(5 * time.Minute)
	for p.BytesUp.Load()-from < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("the large upload did not start: %d bytes sent", p.BytesUp.Load()-from)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// visibility reports when paths' narinfos become visible in a bucket,
// polling every 20 ms.
type visibility struct {
	c      *minio.Client
	bucket string
	mu     sync.Mutex
	want   map[string]chan time.Time // narinfo key → when seen
}

func newVisibility(c *minio.Client, bucket string) *visibility {
	return &visibility{c: c, bucket: bucket, want: map[string]chan time.Time{}}
}

func (v *visibility) add(path string) <-chan time.Time {
	ch := make(chan time.Time, 1)
	v.mu.Lock()
	v.want[cachefmt.Keys.NarinfoOf(path)] = ch
	v.mu.Unlock()
	return ch
}

func (v *visibility) run(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v.mu.Lock()
		keys := make([]string, 0, len(v.want))
		for k := range v.want {
			keys = append(keys, k)
		}
		v.mu.Unlock()
		for _, k := range keys {
			if _, err := v.c.StatObject(ctx, v.bucket, k, minio.StatObjectOptions{}); err == nil {
				now := time.Now()
				v.mu.Lock()
				v.want[k] <- now
				delete(v.want, k)
				v.mu.Unlock()
			}
		}
	}
}

// writeRandomFile writes size incompressible bytes to name, 16 MB at a time.
func writeRandomFile(name string, size int64) error {
	f, err := os.Create(name)
	if err != nil {
		return err
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// msList renders durations as whole milliseconds, for a log line that
// shows when in a run the slow ones fell.
func msList(ds []time.Duration) []int64 {
	out := make([]int64, len(ds))
	for i, d := range ds {
		out[i] = d.Milliseconds()
	}
	return out
}
