package main

// The latency sections run agentd (and stock Nix, as the baseline) against
// MinIO through testenv's DelayProxy, which adds -rtt to every round trip
// (and caps the bandwidth with -bandwidth): a bucket as far away as real
// ones are. MinIO still shares the two cores with everything else.

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	s3bucket "github.com/nixspool/nixspool/internal/bucket/s3"
	"github.com/nixspool/nixspool/internal/testenv"
)

var (
	rttFlag       = flag.Duration("rtt", 100*time.Millisecond, "round trip the delaying proxy adds in the latency sections")
	bandwidthFlag = flag.Float64("bandwidth", 0, "bandwidth cap of the delaying proxy in MB/s per direction (0 = none)")
	burstTiny     = flag.Int("burst-tiny", 300, "burst: tiny paths")
	burstBig      = flag.Int("burst-big", 20, "burst: 2 MB paths")
	noStock       = flag.Bool("no-stock", false, "burst: leave out stock nix copy (it takes minutes over the proxy)")
	fanoutDeps    = flag.Int("fanout-deps", 1000, "fanout: 200 kB dependencies")
	fanoutRuns    = flag.Int("fanout-runs", 3, "fanout: runs")
	reconcileDeps = flag.Int("reconcile-deps", 2000, "reconcile: dependencies of the top path")
)

// delayProxy starts a delaying proxy in front of the bench's MinIO. The
// first one also measures the round trip it adds (a row), so every run
// shows the link it was measured on.
func (b *bench) delayProxy() *testenv.DelayProxy {
	m, _ := b.startMinIO()
	p := testenv.StartDelayProxy(b.t, m.Endpoint, *rttFlag/2, int64(*bandwidthFlag*1e6))
	if !b.rttMeasured {
		b.rttMeasured = true
		via, err1 := httpRTT(p.URL)
		direct, err2 := httpRTT("http://" + m.Endpoint)
		if err1 == nil && err2 == nil {
			add(Row{Name: "proxy: HTTP round trip to MinIO, p50 of 20", Value: ms(via), Unit: "ms", Baseline: "same request straight to MinIO", BaseVal: ms(direct), Target: fmt.Sprintf("≥ %v (-rtt)", *rttFlag)})
		}
	}
	return p
}

// httpRTT is the median time of a small request on a kept-alive connection.
func httpRTT(base string) (time.Duration, error) {
	c := &http.Client{Timeout: 30 * time.Second}
	var d []time.Duration
	for i := 0; i < 21; i++ {
		t0 := time.Now()
		resp, err := c.Get(base + "/minio/health/live")
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		if i > 0 { // the first one opens the connection
			d = append(d, time.Since(t0))
		}
	}
	return percentile(d, .5), nil
}

// burst: 300 tiny and 20 × 2 MB paths queued at once, measured until the
// last narinfo is written, against stock `nix copy` of the same paths over
// the same proxy into an open bucket. Queued twice, each time with a fresh
// agentd and bucket: as a burst of builds queues them (one hook run per
// path, one after another, as Nix runs the post-build-hook in its build
// loop), and by one push of all paths (the uploader alone).
func (b *bench) burst() error {
	nTiny, nBig := *burstTiny, *burstBig
	n := nTiny + nBig
	fmt.Fprintf(os.Stderr, "burst of %d paths (%d tiny + %d × 2 MB) over %v RTT\n", n, nTiny, nBig, *rttFlag)
	dir := filepath.Join(b.work, "burst-src")
	os.MkdirAll(dir, 0o755)
	var files []string
	big := make([]byte, 2_000_000)
	for i := 0; i < n; i++ {
		f := filepath.Join(dir, fmt.Sprintf("burst-%s-%d", randHex(), i))
		data := []byte(randHex() + randHex() + "\n")
		if i >= nTiny {
			rand.Read(big)
			data = big
		}
		if err := os.WriteFile(f, data, 0o644); err != nil {
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
	m, _ := b.startMinIO()
	p := b.delayProxy()

	// Stock Nix over the same link.
	var stock time.Duration
	var stockRSS float64
	var stockInFlight int
	if !*noStock {
		name := b.bucketName()
		m.MakeOpenBucket(name)
		key, err := b.secretKey("burst-stock")
		if err != nil {
			return err
		}
		p.Reset()
		t0 := time.Now()
		rss, err := b.nixCopy(m.BucketHTTPURL(p.Endpoint, name)+"?compression=zstd&secret-key="+key, paths)
		if err != nil {
			return err
		}
		stock, stockRSS, stockInFlight = time.Since(t0), rss, p.MaxInFlight()
		if got := b.countKeys(name, ".narinfo"); got != n {
			return fmt.Errorf("stock nix copy left %d narinfos, want %d", got, n)
		}
	}

	label := fmt.Sprintf("%d paths (%d tiny + %d × 2 MB), %v RTT", n, nTiny, nBig, *rttFlag)
	for _, viaHook := range []bool{true, false} {
		r, err := b.burstRun(p, paths, viaHook)
		if err != nil {
			return err
		}
		if viaHook {
			add(Row{Name: label + fmt.Sprintf(", %d hook runs", n), Value: r.took.Seconds(), Unit: "s", Baseline: "stock nix copy --to http:// (zstd, signed), same proxy", BaseVal: stock.Seconds(), LowerIsBetter: true, Target: "≤ 5 s, ≥ 40× faster"})
			add(Row{Name: "  of which the hook runs", Value: r.hooks.Seconds(), Unit: "s", Baseline: "all uploaded", BaseVal: r.took.Seconds()})
			add(Row{Name: "  hook wall time during the burst, p50", Value: ms(percentile(r.hookD, .5)), Unit: "ms", Baseline: "p99", BaseVal: ms(percentile(r.hookD, .99))})
		} else {
			add(Row{Name: label + ", one push of all", Value: r.took.Seconds(), Unit: "s", Baseline: "stock nix copy, as above", BaseVal: stock.Seconds(), LowerIsBetter: true, Target: "≤ 5 s, ≥ 40× faster"})
		}
		add(Row{Name: "  agentd peak RSS", Value: r.rss, Unit: "MiB", Baseline: "stock nix copy peak RSS", BaseVal: stockRSS})
		add(Row{Name: "  most requests in flight", Value: float64(r.inFlight), Unit: "", Baseline: "stock nix copy", BaseVal: float64(stockInFlight)})
	}
	return nil
}

type burstResult struct {
	took, hooks time.Duration
	hookD       []time.Duration
	rss         float64
	inFlight    int
}

// burstRun queues paths with a fresh agentd and bucket, by one hook run per
// path (one after another: Nix runs the post-build-hook in its build loop)
// or by one push of all, and waits until all are uploaded.
func (b *bench) burstRun(p *testenv.DelayProxy, paths []string, viaHook bool) (*burstResult, error) {
	m := b.minio
	name := b.bucketName()
	m.MakeBucket(name)
	sock, cmdA, err := b.agent("burst-"+randHex()[:6], m.BucketURLVia(p.Endpoint, name, ""), m.Env())
	if err != nil {
		return nil, err
	}
	defer stop(cmdA)
	if err := b.ensureCacheInfo(sock); err != nil {
		return nil, err
	}
	p.Reset()
	r := &burstResult{}
	t0 := time.Now()
	if viaHook {
		hookEnv := append(os.Environ(), "NIXSPOOL_SOCKET="+sock, "NIXSPOOL_STATE_DIR="+filepath.Join(b.work, "burst-hook-state"), "NIXSPOOL_STRICT=1")
		for _, path := range paths {
			c := exec.Command(filepath.Join(*binDir, "hook"))
			c.Env = append(hookEnv, "OUT_PATHS="+path)
			h0 := time.Now()
			if out, err := c.CombinedOutput(); err != nil {
				return nil, fmt.Errorf("hook: %v: %s", err, out)
			}
			r.hookD = append(r.hookD, time.Since(h0))
		}
		r.hooks = time.Since(t0)
	} else if err := push(sock, paths); err != nil {
		return nil, err
	}
	if err := waitUploaded(sock, uint64(len(paths)), 30*time.Minute); err != nil {
		return nil, err
	}
	r.took = time.Since(t0)
	r.rss = peakRSS(cmdA.Process.Pid)
	r.inFlight = p.MaxInFlight()
	if got := b.countKeys(name, ".narinfo"); got != len(paths) {
		return nil, fmt.Errorf("agentd left %d narinfos, want %d", got, len(paths))
	}
	return r, nil
}

// fanout: the first push of a path with many incompressible 200 kB
// dependencies over the slow link: time and agentd's peak RSS, in several
// runs (each a fresh agentd and bucket), against a plain S3 client sending
// the same number of objects and bytes with 32 requests in flight.
func (b *bench) fanout() error {
	nDeps := *fanoutDeps
	fmt.Fprintf(os.Stderr, "first push of 1 + %d × 200 kB paths over %v RTT, %d runs\n", nDeps, *rttFlag, *fanoutRuns)
	cl, err := importClosure(b.env, "bench-fanout-"+randHex()[:6], nDeps, 200_000, true)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, cl.All())
	m, _ := b.startMinIO()
	p := b.delayProxy()

	// Baseline: what the link and MinIO do with a plain client.
	bu, err := b.s3Via(p.Endpoint, b.bucketName())
	if err != nil {
		return err
	}
	payload := make([]byte, 200_000)
	rand.Read(payload)
	ctx := context.Background()
	t0 := time.Now()
	objects := len(cl.All())
	if err := parallel(32, 2*objects, func(i int) error {
		body := payload
		if i%2 == 1 {
			body = payload[:500] // the narinfo
		}
		_, err := bu.Put(ctx, fmt.Sprintf("raw/%d", i), strings.NewReader(string(body)), int64(len(body)), bucket.PutOptions{})
		return err
	}); err != nil {
		return err
	}
	plain := time.Since(t0)

	for run := 1; run <= *fanoutRuns; run++ {
		name := b.bucketName()
		m.MakeBucket(name)
		r, err := b.measuredPush(fmt.Sprintf("fanout-%d", run), m.BucketURLVia(p.Endpoint, name, ""), m.Env(), []string{cl.Top}, 30*time.Minute, p.Reset)
		if err != nil {
			return err
		}
		took, idle, rss := r.took, r.idle, r.peak
		if got := b.countKeys(name, ".narinfo"); got != objects {
			return fmt.Errorf("run %d: %d narinfos in the bucket, want %d", run, got, objects)
		}
		add(Row{Name: fmt.Sprintf("first push 1 + %d × 200 kB, %v RTT, run %d", nDeps, *rttFlag, run), Value: took.Seconds(), Unit: "s", Baseline: fmt.Sprintf("plain S3 client: %d PUTs, same bytes, 32 in flight", 2*objects), BaseVal: plain.Seconds(), LowerIsBetter: true, Target: "≤ 15 s"})
		add(Row{Name: fmt.Sprintf("  agentd peak RSS, run %d", run), Value: rss, Unit: "MiB", Baseline: "agentd before the push", BaseVal: idle, Target: "≤ 200 MiB"})
		add(Row{Name: fmt.Sprintf("  most requests in flight, run %d", run), Value: float64(p.MaxInFlight()), Unit: "", Baseline: "plain client", BaseVal: 32})
	}
	return nil
}

// reconcile: a fresh agentd (empty state directory, so no presence cache)
// pushes the top path of a closure the bucket already holds entirely, over
// the slow link: time, and objects sent again (PUTs the proxy saw),
// against listing the bucket over the same link.
func (b *bench) reconcile() error {
	nDeps := *reconcileDeps
	fmt.Fprintf(os.Stderr, "reconcile %d cached paths from a fresh machine over %v RTT\n", nDeps+1, *rttFlag)
	cl, err := importClosure(b.env, "bench-reconcile-"+randHex()[:6], nDeps, 100, false)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, cl.All())
	m, _ := b.startMinIO()
	name := b.bucketName()
	m.MakeBucket(name)

	// Another machine uploaded the closure (straight to MinIO, quickly).
	sock, cmdA, err := b.agent("reconcile-seed-"+randHex()[:6], m.BucketURL(name, ""), m.Env(), "--jobs", "16")
	if err != nil {
		return err
	}
	err = push(sock, []string{cl.Top})
	if err == nil {
		err = waitUploaded(sock, 1, 30*time.Minute)
	}
	stop(cmdA)
	if err != nil {
		return err
	}
	if got := b.countKeys(name, ".narinfo"); got != nDeps+1 {
		return fmt.Errorf("seeding: %d narinfos, want %d", got, nDeps+1)
	}

	p := b.delayProxy()
	// Baseline: list every key of the bucket over the same link.
	t0 := time.Now()
	listed := 0
	for o := range b.clientVia(p.Endpoint).ListObjects(context.Background(), name, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			return o.Err
		}
		listed++
	}
	list := time.Since(t0)

	sock, cmdA, err = b.agent("reconcile-fresh-"+randHex()[:6], m.BucketURLVia(p.Endpoint, name, ""), m.Env())
	if err != nil {
		return err
	}
	defer stop(cmdA)
	p.Reset()
	t0 = time.Now()
	if err := push(sock, []string{cl.Top}); err != nil {
		return err
	}
	if err := waitUploaded(sock, 1, 30*time.Minute); err != nil {
		return err
	}
	took := time.Since(t0)
	puts := p.Count(http.MethodPut, "")
	reqs := len(p.Requests())
	shown := 0
	for _, r := range p.Requests() {
		if r.Method == http.MethodPut && shown < 5 {
			fmt.Fprintf(os.Stderr, "  sent again: PUT %s\n", r.Path)
			shown++
		}
	}
	add(Row{Name: fmt.Sprintf("reconcile %d cached paths, fresh agentd, %v RTT", nDeps+1, *rttFlag), Value: took.Seconds(), Unit: "s", Baseline: fmt.Sprintf("listing the bucket (%d keys) over the same link", listed), BaseVal: list.Seconds(), LowerIsBetter: true, Target: "≤ 3 s"})
	add(Row{Name: "  objects sent again (PUTs through the proxy)", Value: float64(puts), Unit: "", Baseline: "requests in all", BaseVal: float64(reqs), Target: "0"})
	return nil
}

// stop kills an agentd the section started.
func stop(cmd *exec.Cmd) {
	cmd.Process.Kill()
	cmd.Wait()
}

// ensureCacheInfo waits until agentd can reach its cache (it writes
// nix-cache-info on the way), so a timed section starts with a ready agent.
func (b *bench) ensureCacheInfo(sock string) error {
	deadline := time.Now().Add(time.Minute)
	for {
		s, err := status(sock)
		if err != nil {
			return err
		}
		if s.CacheReachable != nil && *s.CacheReachable {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agentd did not reach its cache: %s", s.LastError)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nixCopy runs stock `nix copy --to dest paths…` with its own narinfo
// cache and returns its peak RSS in MiB.
func (b *bench) nixCopy(dest string, paths []string) (float64, error) {
	cmd := exec.Command("nix", append([]string{"copy", "--to", dest}, paths...)...)
	cmd.Env = append(append([]string(nil), b.env...), "XDG_CACHE_HOME="+b.t.TempDir())
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("nix copy --to %s: %v\n%s", dest, err, out.String())
	}
	ru, _ := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if ru == nil {
		return 0, nil
	}
	return float64(ru.Maxrss) / 1024, nil
}

// secretKey writes a new Nix signing key and returns its file.
func (b *bench) secretKey(name string) (string, error) {
	out, err := exec.Command("nix", "--extra-experimental-features", "nix-command", "key", "generate-secret", "--key-name", name+"-1").Output()
	if err != nil {
		return "", fmt.Errorf("generate key: %w", err)
	}
	f := filepath.Join(b.t.TempDir(), "secret.key")
	return f, os.WriteFile(f, out, 0o600)
}

// bucketName is a new bucket name (not created).
func (b *bench) bucketName() string { return "bench-" + randHex()[:8] }

// countKeys counts the keys of a bucket ending in suffix, asking MinIO
// directly.
func (b *bench) countKeys(name, suffix string) int {
	n := 0
	for o := range b.minio.Client().ListObjects(context.Background(), name, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			b.t.Fatalf("list %s: %v", name, o.Err)
		}
		if strings.HasSuffix(o.Key, suffix) {
			n++
		}
	}
	return n
}

// clientVia is an admin client of the bench's MinIO reached at endpoint.
func (b *bench) clientVia(endpoint string) *minio.Client { return b.clientOf(b.minio, endpoint) }

// clientOf is an admin client of m reached at endpoint.
func (b *bench) clientOf(m *testenv.MinIO, endpoint string) *minio.Client {
	nc, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4(m.AccessKey, m.SecretKey, ""), Region: "us-east-1"})
	if err != nil {
		b.t.Fatalf("%v", err)
	}
	return nc
}

// s3Via creates a bucket and returns nixspool's S3 client for it, reached
// at endpoint.
func (b *bench) s3Via(endpoint, name string) (*s3bucket.Bucket, error) {
	b.minio.MakeBucket(name)
	for _, kv := range b.minio.Env() {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	c, err := cacheurl.Parse(b.minio.BucketURLVia(endpoint, name, ""))
	if err != nil {
		return nil, err
	}
	return s3bucket.New(c)
}
