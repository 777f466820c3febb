package main

// hookconc: hooks running at once. Since Nix 2.35 the post-build-hook runs
// asynchronously, up to max-jobs at a time, and a build that depends on an
// output waits for that output's hook: what matters is the latency of each
// hook when many run together, not only of one hook alone.

import (
	"bufio"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
)

var (
	hookConcRuns   = flag.Int("hookconc-runs", 640, "hookconc: hook runs (and as many floor runs) per level of concurrency")
	hookConcLevels = flag.String("hookconc-levels", "1,8,32", "hookconc: hooks at once")
	hookConcPprof  = flag.String("hookconc-pprof", "", "hookconc: write agentd's CPU profile over the measurement to this file")
	hookConcBgRate = flag.Float64("hookconc-bg-rate", 5, "hookconc: background paths (512 kB, incompressible) pushed per second while measuring")
)

func init() {
	register("hookconc", "1, 8, 32 hooks at once on new paths (multi-user Nix, GC roots, uploads to MinIO flowing): p50/p99 against a minimal exec+connect+reply client at the same concurrency, queue commits per hook", (*bench).hookConc)
}

// floorSrc is the minimal client: exec, connect, send the request, read a
// one-line reply, exit. Raw system calls, as the hook's protocol client.
const floorSrc = `package main

import (
	"os"
	"syscall"
)

func main() {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		os.Exit(1)
	}
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: os.Getenv("NIXSPOOL_SOCKET")}); err != nil {
		os.Exit(1)
	}
	req := []byte(os.Getenv("FLOOR_REQUEST"))
	for len(req) > 0 {
		n, err := syscall.Write(fd, req)
		if err != nil {
			os.Exit(1)
		}
		req = req[n:]
	}
	var buf [512]byte
	for {
		n, err := syscall.Read(fd, buf[:])
		if err != nil || n == 0 {
			os.Exit(1)
		}
		if buf[n-1] == '\n' {
			os.Exit(0)
		}
	}
}
`

// floorServer answers every request on a unix socket at once with "ok".
type floorServer struct {
	l  net.Listener
	wg sync.WaitGroup
}

func startFloorServer(sock string) (*floorServer, error) {
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("floor server: %w", err)
	}
	reply, _ := protocol.Encode(&protocol.Response{V: protocol.Version, OK: true})
	s := &floorServer{l: l}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := bufio.NewReader(c).ReadSlice('\n'); err == nil {
					c.Write(reply)
				}
			}()
		}
	}()
	return s, nil
}

func (s *floorServer) close() { s.l.Close(); s.wg.Wait() }

// buildGo builds a one-file Go program and returns the binary.
func (b *bench) buildGo(name, src string) (string, error) {
	dir := filepath.Join(b.work, name)
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644)
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module "+name+"\n\ngo 1.22\n"), 0o644)
	build := exec.Command("go", "build", "-o", name, ".")
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %v\n%s", name, err, out)
	}
	return filepath.Join(dir, name), nil
}

// addFiles writes n files of size bytes (random, or a short random line
// when size is 0) and adds them to the store.
func (b *bench) addFiles(prefix string, n, size int) ([]string, error) {
	dir := filepath.Join(b.work, prefix+"-src")
	os.MkdirAll(dir, 0o755)
	defer os.RemoveAll(dir)
	var files []string
	data := make([]byte, size)
	for i := 0; i < n; i++ {
		f := filepath.Join(dir, fmt.Sprintf("%s-%s-%d", prefix, randHex(), i))
		content := []byte(randHex() + "\n")
		if size > 0 {
			rand.Read(data)
			content = data
		}
		if err := os.WriteFile(f, content, 0o644); err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	var paths []string
	for len(files) > 0 { // bounded command lines
		k := min(len(files), 1000)
		p, err := nixStoreAdd(b.env, files[:k]...)
		if err != nil {
			return nil, err
		}
		paths = append(paths, p...)
		files = files[k:]
	}
	return paths, nil
}

func (b *bench) hookConc() error {
	var levels []int
	for _, s := range strings.Split(*hookConcLevels, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || c < 1 {
			return fmt.Errorf("-hookconc-levels: bad level %q", s)
		}
		levels = append(levels, c)
	}
	runs := *hookConcRuns / 2 * 2
	fmt.Fprintf(os.Stderr, "hooks at once (%v), %d new paths per level\n", levels, runs)
	floorBin, err := b.buildGo("floor", floorSrc)
	if err != nil {
		return err
	}
	// Warm-up runs take paths too.
	warm := 0
	for _, c := range levels {
		warm += c
	}
	hookPaths, err := b.addFiles("hookconc", len(levels)*runs+warm, 0)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, hookPaths)
	const bgSize = 512 << 10
	bgPaths, err := b.addFiles("hookconc-bg", 600, bgSize)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, bgPaths)

	// Multi-user Nix: agentd checks the paths with the Nix daemon, and
	// roots them, as on a real machine.
	daemon := testenv.StartNixDaemon(b.t, b.env)
	roots := filepath.Join("/nix/var/nix/gcroots", "nixspool-bench-"+randHex()[:8])
	defer os.RemoveAll(roots)
	metricsAddr, err := freeTCPAddr()
	if err != nil {
		return err
	}
	m, err := b.startMinIO()
	if err != nil {
		return err
	}
	name := b.bucketName()
	m.MakeBucket(name)
	env := append(m.Env(), "NIX_DAEMON_SOCKET_PATH="+daemon.Socket)
	extra := []string{"--gc-roots", roots, "--metrics-listen", metricsAddr}
	pprofAddr := ""
	if *hookConcPprof != "" {
		if pprofAddr, err = freeTCPAddr(); err != nil {
			return err
		}
		extra = append(extra, "--pprof-listen", pprofAddr)
	}
	sock, cmdA, err := b.agent("hookconc", m.BucketURL(name, ""), env, extra...)
	if err != nil {
		return err
	}
	defer stop(cmdA)
	if err := b.ensureCacheInfo(sock); err != nil {
		return err
	}

	floorSock := filepath.Join(b.work, "floor.sock")
	fs, err := startFloorServer(floorSock)
	if err != nil {
		return err
	}
	defer fs.close()

	var next atomic.Int64
	hookEnv := append(os.Environ(), "NIXSPOOL_SOCKET="+sock, "NIXSPOOL_STATE_DIR="+filepath.Join(b.work, "hookconc", "state"), "NIXSPOOL_STRICT=1", "NIXSPOOL_GC_ROOTS="+roots)
	hookLog, err := os.Create(filepath.Join(b.work, "hookconc", "hooks.log"))
	if err != nil {
		return err
	}
	defer hookLog.Close()
	mkHook := func() *exec.Cmd {
		i := next.Add(1) - 1
		c := exec.Command(filepath.Join(*binDir, "hook"))
		c.Env = append(hookEnv[:len(hookEnv):len(hookEnv)], "OUT_PATHS="+hookPaths[i])
		c.Stderr = hookLog
		return c
	}
	floorReq, _ := protocol.Encode(&protocol.Request{V: protocol.Version, Op: protocol.OpEnqueue, Paths: hookPaths[:1]})
	floorEnv := append(os.Environ(), "NIXSPOOL_SOCKET="+floorSock, "FLOOR_REQUEST="+string(floorReq))
	// The hook binary against the instantly answering server: the hook's
	// own cost, without agentd's.
	hookFloorEnv := append(os.Environ(), "NIXSPOOL_SOCKET="+floorSock, "NIXSPOOL_STATE_DIR="+filepath.Join(b.work, "hookconc", "state"), "NIXSPOOL_STRICT=1", "OUT_PATHS="+hookPaths[0])
	mkHookFloor := func() *exec.Cmd {
		c := exec.Command(filepath.Join(*binDir, "hook"))
		c.Env = hookFloorEnv
		c.Stderr = hookLog
		return c
	}
	mkFloor := func() *exec.Cmd {
		c := exec.Command(floorBin)
		c.Env = floorEnv
		return c
	}

	// Uploads flow all along: new incompressible paths pushed at a steady
	// rate from before the first hook until the last.
	before, err := status(sock)
	if err != nil {
		return err
	}
	bg := startBackgroundPushes(sock, bgPaths, *hookConcBgRate)

	type result struct {
		hook, floor, hookFloor []time.Duration
		hookRate               float64
		commits                float64
		served                 float64 // agentd's mean time per enqueue, s
	}
	res := map[int]*result{}
	var profile chan error
	if pprofAddr != "" {
		profile = make(chan error, 1)
		go func() { profile <- fetchProfile(pprofAddr, *hookConcPprof) }()
	}
	for _, c := range levels {
		timeExecs(c, c, mkFloor)
		if _, _, err := timeExecs(c, c, mkHook); err != nil {
			bg.stop()
			return fmt.Errorf("warm-up: %w", err)
		}
		r := &result{}
		// An agentd without the counter (an older build) gives no
		// commit figure.
		c0, cerr := scrapeCounter(metricsAddr, "nixspool_queue_commits_total")
		sum0, _ := scrapeCounter(metricsAddr, "nixspool_enqueue_duration_seconds_sum")
		var hookTime time.Duration
		// Interleaved halves, so that drift hits both.
		for half := 0; half < 2; half++ {
			f, _, err := timeExecs(runs/2, c, mkFloor)
			if err != nil {
				bg.stop()
				return err
			}
			r.floor = append(r.floor, f...)
			hf, _, err := timeExecs(runs/2, c, mkHookFloor)
			if err != nil {
				bg.stop()
				return err
			}
			r.hookFloor = append(r.hookFloor, hf...)
			h, took, err := timeExecs(runs/2, c, mkHook)
			if err != nil {
				bg.stop()
				return err
			}
			r.hook = append(r.hook, h...)
			hookTime += took
		}
		c1, err := scrapeCounter(metricsAddr, "nixspool_queue_commits_total")
		if cerr == nil && err == nil {
			r.commits = (c1 - c0) / float64(runs)
		} else {
			r.commits = -1
		}
		sum1, _ := scrapeCounter(metricsAddr, "nixspool_enqueue_duration_seconds_sum")
		r.served = (sum1 - sum0) / float64(runs)
		r.hookRate = float64(runs) / hookTime.Seconds()
		res[c] = r
	}
	pushed, bgErr := bg.stop()
	if profile != nil {
		if err := <-profile; err != nil {
			return err
		}
		return fmt.Errorf("profiling run: no figures; profile in %s", *hookConcPprof)
	}
	if bgErr != nil {
		return fmt.Errorf("background pushes: %w", bgErr)
	}
	during, err := status(sock)
	if err != nil {
		return err
	}
	hooked := int(next.Load())
	if err := waitUploaded(sock, before.Uploaded+uint64(hooked+pushed), 10*time.Minute); err != nil {
		return err
	}
	// Nothing was spooled (NIXSPOOL_STRICT=1 would have failed the run),
	// and the bucket holds every path.
	if got := b.countKeys(name, ".narinfo"); got != hooked+pushed {
		return fmt.Errorf("bucket holds %d narinfos, want %d (%d hooked + %d pushed)", got, hooked+pushed, hooked, pushed)
	}

	for _, c := range levels {
		r := res[c]
		floor := fmt.Sprintf("minimal client (exec + connect + reply), %d at once", c)
		add(Row{Name: fmt.Sprintf("%d hooks at once, new paths, p50", c), Value: ms(percentile(r.hook, .5)), Unit: "ms", Baseline: floor + ", p50", BaseVal: ms(percentile(r.floor, .5))})
		target := ""
		if c == 32 {
			target = "≤ 2× floor"
		}
		add(Row{Name: fmt.Sprintf("%d hooks at once, new paths, p99", c), Value: ms(percentile(r.hook, .99)), Unit: "ms", Baseline: floor + ", p99", BaseVal: ms(percentile(r.floor, .99)), Target: target})
		add(Row{Name: fmt.Sprintf("  hook binary against the instant server, %d at once, p50", c), Value: ms(percentile(r.hookFloor, .5)), Unit: "ms", Baseline: "p99", BaseVal: ms(percentile(r.hookFloor, .99))})
		add(Row{Name: fmt.Sprintf("  agentd's time per enqueue (request read to durable), %d at once, mean", c), Value: r.served * 1000, Unit: "ms"})
		if r.commits >= 0 {
			add(Row{Name: fmt.Sprintf("  queue commits per hook, %d at once (background pushes and acks included)", c), Value: r.commits, Unit: "", Baseline: "one commit per hook", BaseVal: 1})
		}
		add(Row{Name: fmt.Sprintf("  hooks/s, %d at once", c), Value: r.hookRate, Unit: "/s"})
	}
	add(Row{Name: "  paths uploaded during the measurement (hooked and background)", Value: float64(during.Uploaded - before.Uploaded), Unit: "paths", Baseline: "background paths pushed (512 kB, incompressible)", BaseVal: float64(pushed)})
	return nil
}

// backgroundPushes pushes one path after another at a steady rate.
type backgroundPushes struct {
	cancel context.CancelFunc
	done   chan struct{}
	pushed int
	err    error
}

func startBackgroundPushes(sock string, paths []string, rate float64) *backgroundPushes {
	ctx, cancel := context.WithCancel(context.Background())
	bp := &backgroundPushes{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(bp.done)
		if rate <= 0 {
			return
		}
		tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
		defer tick.Stop()
		for _, p := range paths {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if err := push(sock, []string{p}); err != nil {
				bp.err = err
				return
			}
			bp.pushed++
		}
		fmt.Fprintln(os.Stderr, "  (background pushes ran out of paths before the measurement ended)")
	}()
	return bp
}

// stop ends the pushes and returns how many paths were pushed.
func (bp *backgroundPushes) stop() (int, error) {
	bp.cancel()
	<-bp.done
	return bp.pushed, bp.err
}

// fetchProfile writes agentd's CPU profile of the next 20 seconds to file.
func fetchProfile(addr, file string) error {
	resp, err := http.Get("http://" + addr + "/debug/pprof/profile?seconds=20")
	if err != nil {
		return fmt.Errorf("profile: %w", err)
	}
	defer resp.Body.Close()
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("profile: %w", err)
	}
	return f.Close()
}

// freeTCPAddr is a loopback address with a port free right now.
func freeTCPAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// scrapeCounter reads one unlabelled metric from agentd's metrics endpoint.
func scrapeCounter(addr, name string) (float64, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, fmt.Errorf("scrape metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("metrics lack %s", name)
}
