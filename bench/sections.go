package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	s3bucket "github.com/nixspool/nixspool/internal/bucket/s3"
	"github.com/nixspool/nixspool/internal/uploader"
)

const trivialSrc = `package main

import (
	"os"
	"syscall"
)

// Connects to the socket and exits: the floor for any hook.
func main() {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		os.Exit(1)
	}
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: os.Getenv("NIXSPOOL_SOCKET")}); err != nil {
		os.Exit(1)
	}
	syscall.Close(fd)
}
`

// hookLatency: the hook's wall time against a trivial binary's exec, and
// hooks/s with 32 concurrent hooks.
func (b *bench) hookLatency() error {
	fmt.Fprintln(os.Stderr, "hook latency and throughput")
	sock, _, err := b.agent("hook", "file://"+filepath.Join(b.work, "hook-cache"), nil)
	if err != nil {
		return err
	}
	dir := filepath.Join(b.work, "trivial")
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "main.go"), []byte(trivialSrc), 0o644)
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module trivial\n\ngo 1.22\n"), 0o644)
	build := exec.Command("go", "build", "-o", "trivial", ".")
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build trivial binary: %v\n%s", err, out)
	}
	src := filepath.Join(b.work, "hook-out-"+randHex())
	os.WriteFile(src, []byte("hook bench\n"), 0o644)
	paths, err := nixStoreAdd(b.env, src)
	if err != nil {
		return err
	}
	hookEnv := append(os.Environ(), "NIXSPOOL_SOCKET="+sock, "NIXSPOOL_STATE_DIR="+filepath.Join(b.work, "hook", "state"), "OUT_PATHS="+paths[0], "NIXSPOOL_STRICT=1", "NIXSPOOL_GC_ROOTS=off")
	mkHook := func() *exec.Cmd {
		c := exec.Command(filepath.Join(*binDir, "hook"))
		c.Env = hookEnv
		return c
	}
	mkTrivial := func() *exec.Cmd {
		c := exec.Command(filepath.Join(dir, "trivial"))
		c.Env = hookEnv
		return c
	}
	// Warm up both, then measure interleaved halves so drift hits both.
	timeExecs(50, 1, mkHook)
	timeExecs(50, 1, mkTrivial)
	var hookD, trivD []time.Duration
	for i := 0; i < 2; i++ {
		t, _, err := timeExecs(*hookN/2, 1, mkTrivial)
		if err != nil {
			return err
		}
		trivD = append(trivD, t...)
		h, _, err := timeExecs(*hookN/2, 1, mkHook)
		if err != nil {
			return err
		}
		hookD = append(hookD, h...)
	}
	add(Row{Name: "hook wall time p50", Value: ms(percentile(hookD, .5)), Unit: "ms", Baseline: "trivial binary exec+connect p50", BaseVal: ms(percentile(trivD, .5)), Target: "≤ 2.5 ms, ≤ floor + 1.5 ms"})
	add(Row{Name: "hook wall time p99", Value: ms(percentile(hookD, .99)), Unit: "ms", Baseline: "trivial binary exec+connect p99", BaseVal: ms(percentile(trivD, .99)), Target: "≤ 5 ms"})

	const n = 2000
	_, tw, err := timeExecs(n, 32, mkTrivial)
	if err != nil {
		return err
	}
	_, hw, err := timeExecs(n, 32, mkHook)
	if err != nil {
		return err
	}
	add(Row{Name: "hooks/s, 32 concurrent", Value: n / hw.Seconds(), Unit: "/s", Baseline: "trivial binary execs/s, 32 concurrent", BaseVal: n / tw.Seconds(), Target: "≥ 700/s"})
	return nil
}

// bigPath: one large path (the Go toolchain) uploaded to MinIO against
// `nix copy --to file://…?compression=zstd` of the same path.
func (b *bench) bigPath() error {
	fmt.Fprintln(os.Stderr, "big path (Go toolchain) upload")
	goroot := runtimeGOROOT()
	paths, err := nixStoreAdd(b.env, goroot)
	if err != nil {
		return err
	}
	big := paths[0]
	info, err := narSize(b.env, big)
	if err != nil {
		return err
	}
	m, err := b.startMinIO()
	if err != nil {
		return err
	}
	key, err := b.secretKey("big-stock")
	if err != nil {
		return err
	}
	var ours, nixs, nixHTTP []float64
	var rss float64
	for i := 0; i < 3; i++ {
		// Baselines: Nix's own pipeline into a fresh local cache, and into
		// the same MinIO over HTTP (a bucket that takes anonymous PUTs:
		// stock Nix 2.8 has no S3 support), zstd, signed.
		dst := filepath.Join(b.work, "nixcopy-"+strconv.Itoa(i))
		t0 := time.Now()
		cmd := exec.Command("nix", "copy", "--to", "file://"+dst+"?compression=zstd", big)
		cmd.Env = b.env
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nix copy: %v\n%s", err, out)
		}
		nixs = append(nixs, float64(info)/1e6/time.Since(t0).Seconds())
		os.RemoveAll(dst)

		name := b.bucketName()
		m.MakeOpenBucket(name)
		t0 = time.Now()
		if _, err := b.nixCopy(m.BucketHTTPURL(m.Endpoint, name)+"?compression=zstd&secret-key="+key, []string{big}); err != nil {
			return err
		}
		nixHTTP = append(nixHTTP, float64(info)/1e6/time.Since(t0).Seconds())

		sock, cmdA, err := b.agent("big-"+strconv.Itoa(i), b.newBucket(), m.Env())
		if err != nil {
			return err
		}
		t0 = time.Now()
		if err := push(sock, []string{big}); err != nil {
			return err
		}
		if err := waitUploaded(sock, 1, 10*time.Minute); err != nil {
			return err
		}
		ours = append(ours, float64(info)/1e6/time.Since(t0).Seconds())
		rss = max(rss, peakRSS(cmdA.Process.Pid))
		cmdA.Process.Kill()
		cmdA.Wait()
	}
	add(Row{Name: fmt.Sprintf("big path %.0f MB NAR → MinIO, median of 3", float64(info)/1e6), Value: median(ours), Unit: "MB/s", Baseline: "stock nix copy --to http:// into the same MinIO (zstd, signed)", BaseVal: median(nixHTTP), Target: "≥ 1.5×"})
	add(Row{Name: "  same upload", Value: median(ours), Unit: "MB/s", Baseline: "nix copy --to file://?compression=zstd (local disk, no HTTP)", BaseVal: median(nixs), Target: "≥ 1.4×"})
	add(Row{Name: "agentd peak RSS, big path", Value: rss, Unit: "MiB", Baseline: "NAR size", BaseVal: float64(info) / (1 << 20)})
	return nil
}

// tinyPaths: many tiny paths uploaded (NAR + narinfo each, presence by
// listing) against nix copy of the same paths to a local file:// cache, a
// plain S3 client sending the same requests, and MinIO's PUT ceiling.
func (b *bench) tinyPaths() error {
	n := *tinyN
	fmt.Fprintf(os.Stderr, "%d tiny paths\n", n)
	dir := filepath.Join(b.work, "tiny")
	os.MkdirAll(dir, 0o755)
	var files []string
	for i := 0; i < n; i++ {
		f := filepath.Join(dir, fmt.Sprintf("tiny-%s-%d", randHex(), i))
		os.WriteFile(f, []byte(randHex()+randHex()+"\n"), 0o644)
		files = append(files, f)
	}
	paths, err := nixStoreAdd(b.env, files...)
	if err != nil {
		return err
	}
	dst := filepath.Join(b.work, "tiny-nixcopy")
	t0 := time.Now()
	cmd := exec.Command("nix", append([]string{"copy", "--to", "file://" + dst + "?compression=zstd"}, paths...)...)
	cmd.Env = b.env
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nix copy: %v\n%s", err, out)
	}
	nixRate := float64(n) / time.Since(t0).Seconds()

	m, err := b.startMinIO()
	if err != nil {
		return err
	}
	traced := min(200, n)
	mix, err := b.traceTiny(m, paths[:traced])
	if err != nil {
		return err
	}
	// The plain client runs before and after agentd, into buckets of its
	// own, and the baseline is the mean of both: MinIO's rate drifts from
	// run to run (by up to a factor of two here), and a baseline taken on
	// one side only would carry that drift. A first, discarded run warms
	// MinIO up for both (its first run here is the slowest).
	if _, err := b.plainTiny(m, mix, traced, max(n/2, traced), *tinyJobs); err != nil {
		return err
	}
	plainBefore, err := b.plainTiny(m, mix, traced, n, *tinyJobs)
	if err != nil {
		return err
	}
	sock, cmdA, err := b.agent("tiny", b.newBucket(), m.Env(), "--jobs", strconv.Itoa(*tinyJobs))
	if err != nil {
		return err
	}
	defer cmdA.Process.Kill()
	t0 = time.Now()
	if err := push(sock, paths); err != nil {
		return err
	}
	if err := waitUploaded(sock, uint64(n), 10*time.Minute); err != nil {
		return err
	}
	rate := float64(n) / time.Since(t0).Seconds()
	add(Row{Name: fmt.Sprintf("%d tiny paths → MinIO", n), Value: rate, Unit: "paths/s", Baseline: "nix copy to file:// (local disk, no HTTP)", BaseVal: nixRate, Target: "≥ 400/s"})
	cmdA.Process.Kill() // idle, but its CPU is not the plain client's
	plainAfter, err := b.plainTiny(m, mix, traced, n, *tinyJobs)
	if err != nil {
		return err
	}
	plain := (plainBefore + plainAfter) / 2
	add(Row{Name: fmt.Sprintf("%d tiny paths → MinIO", n), Value: rate, Unit: "paths/s", Baseline: fmt.Sprintf("plain S3 client, the same requests per path, %d paths at once (mean of a run before agentd, %.0f/s, and one after, %.0f/s)", *tinyJobs, plainBefore, plainAfter), BaseVal: plain, Target: "≥ 0.9×"})

	// The ceiling on this box: a path is two PUTs (NAR, narinfo), and
	// MinIO shares the two cores. Measure MinIO's raw rate of 1 KB PUTs.
	bu, _, err := b.freshBucket()
	if err != nil {
		return err
	}
	const puts = 2000
	payload := strings.Repeat("x", 1000)
	t0 = time.Now()
	if err := parallel(16, puts, func(i int) error {
		_, err := bu.Put(context.Background(), fmt.Sprintf("raw/%d", i), strings.NewReader(payload), int64(len(payload)), bucket.PutOptions{})
		return err
	}); err != nil {
		return err
	}
	ceiling := puts / time.Since(t0).Seconds() / 2
	add(Row{Name: fmt.Sprintf("%d tiny paths → MinIO", n), Value: rate, Unit: "paths/s", Baseline: "MinIO ceiling: raw 1 KB PUTs/s (16 goroutines) ÷ 2", BaseVal: ceiling})
	return nil
}

// presence: the closure check of a path with 10,000 dependencies that are
// all in the bucket already, cold and with the presence cache.
func (b *bench) presence() error {
	const n = 10000
	fmt.Fprintf(os.Stderr, "presence check of %d paths\n", n)
	if _, err := b.startMinIO(); err != nil {
		return err
	}
	bu, c, err := b.freshBucket()
	if err != nil {
		return err
	}
	ctx := context.Background()
	var refs []string
	keys := make([]string, n)
	for i := 0; i < n; i++ {
		h := fakeHash(i)
		p := "/nix/store/" + h + "-dep-" + strconv.Itoa(i)
		refs = append(refs, p)
		keys[i] = cachefmt.Keys.Narinfo(h)
	}
	if err := parallel(32, n, func(i int) error {
		_, err := bu.Put(ctx, keys[i], stringsReader("x"), 1, bucket.PutOptions{})
		return err
	}); err != nil {
		return err
	}
	up, err := uploader.New(uploader.Options{Bucket: bu, Cache: c, Store: nil, TempDir: filepath.Join(b.work, "presence-tmp")})
	if err != nil {
		return err
	}
	// Baseline: one sequential HEAD per key, the naive presence check.
	t0 := time.Now()
	for i := 0; i < 2000; i++ {
		if _, err := bu.Stat(ctx, keys[i]); err != nil {
			return err
		}
	}
	seqPer := time.Since(t0) / 2000
	t0 = time.Now()
	if missing, err := up.CheckPresence(ctx, refs); err != nil || len(missing) != 0 {
		return fmt.Errorf("presence check: %d missing, %v", len(missing), err)
	}
	cold := time.Since(t0)
	t0 = time.Now()
	if _, err := up.CheckPresence(ctx, refs); err != nil {
		return err
	}
	warm := time.Since(t0)
	add(Row{Name: "presence check 10,000 paths, cold", Value: cold.Seconds(), Unit: "s", Baseline: "sequential HEADs (extrapolated)", BaseVal: (seqPer * n).Seconds(), Target: "≤ 3 s"})
	add(Row{Name: "presence check 10,000 paths, cached", Value: warm.Seconds(), Unit: "s", Baseline: "same check, cold", BaseVal: cold.Seconds(), Target: "≤ 0.5 s"})
	return nil
}

// hugePathRSS: agentd's peak RSS while uploading a path of more than 1 GiB.
func (b *bench) hugePathRSS() error {
	fmt.Fprintln(os.Stderr, "agentd peak RSS with a 1.1 GiB path")
	dir := filepath.Join(b.work, "huge-"+randHex())
	os.MkdirAll(dir, 0o755)
	buf := make([]byte, 64<<20)
	rand.Read(buf)
	for i := 0; i < 18; i++ { // 18 × 64 MiB = 1.125 GiB
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("part-%02d", i)), buf, 0o644); err != nil {
			return err
		}
		buf[0]++ // keep files distinct
	}
	paths, err := nixStoreAdd(b.env, dir)
	os.RemoveAll(dir)
	if err != nil {
		return err
	}
	defer exec.Command("nix-store", "--delete", paths[0]).Run()
	m, err := b.startMinIO()
	if err != nil {
		return err
	}
	sock, cmdA, err := b.agent("huge", b.newBucket(), m.Env())
	if err != nil {
		return err
	}
	defer cmdA.Process.Kill()
	base := peakRSS(cmdA.Process.Pid)
	if err := push(sock, paths); err != nil {
		return err
	}
	if err := waitUploaded(sock, 1, 20*time.Minute); err != nil {
		return err
	}
	add(Row{Name: "agentd peak RSS, 1.1 GiB path", Value: peakRSS(cmdA.Process.Pid), Unit: "MiB", Baseline: "agentd RSS before the upload", BaseVal: base, Target: "≤ 200 MiB"})
	return nil
}

// freshBucket makes a new bucket on the bench's MinIO and a client for it
// with the server's credentials.
func (b *bench) freshBucket() (*s3bucket.Bucket, *cacheurl.Cache, error) {
	for _, kv := range b.minio.Env() {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	c, err := cacheurl.Parse(b.newBucket())
	if err != nil {
		return nil, nil, err
	}
	bu, err := s3bucket.New(c)
	return bu, c, err
}
