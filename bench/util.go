package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nixspool/nixspool/internal/testenv"
)

// benchT lets the test helpers run outside `go test`: failures abort the
// benchmark with a message.
type benchT struct {
	work     string
	cleanups []func()
}

func (b *benchT) Helper() {}
func (b *benchT) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}
func (b *benchT) Skipf(format string, args ...any) { b.Fatalf(format, args...) }
func (b *benchT) TempDir() string {
	d, err := os.MkdirTemp(b.work, "t-")
	if err != nil {
		b.Fatalf("%v", err)
	}
	return d
}
func (b *benchT) Cleanup(f func()) { b.cleanups = append(b.cleanups, f) }
func (b *benchT) runCleanups() {
	for i := len(b.cleanups) - 1; i >= 0; i-- {
		b.cleanups[i]()
	}
}

// startMinIO starts one MinIO for the whole run (on first use).
func (b *bench) startMinIO() (*testenv.MinIO, error) {
	if b.minio == nil {
		b.minio = testenv.StartMinIO(b.t)
	}
	return b.minio, nil
}

// startDistantMinIO starts a MinIO of its own standing in for a distant
// store (behind a delay proxy), its data on tmpfs when /dev/shm has room
// for need bytes: a distant store's disk is not this machine's, and on one
// shared disk the kernel's write-back of one upload's data (every 30 s,
// hundreds of MB at once) stalls the store's small writes for a second or
// more, which would be charged to the uploader. The data is removed at
// the end of the run.
func (b *bench) startDistantMinIO(need int64) *testenv.MinIO {
	var st syscall.Statfs_t
	if syscall.Statfs("/dev/shm", &st) == nil && int64(st.Bavail)*st.Bsize > need+need/4 {
		if dir, err := os.MkdirTemp("/dev/shm", "nixspool-bench-"); err == nil {
			b.t.Cleanup(func() { os.RemoveAll(dir) })
			return testenv.StartMinIOIn(b.t, dir)
		}
	}
	fmt.Fprintf(os.Stderr, "  (no room on /dev/shm: the distant store's data shares this machine's disk)\n")
	return testenv.StartMinIO(b.t)
}

// newBucket makes a fresh bucket and returns its cache URL.
func (b *bench) newBucket() string {
	name := "bench-" + randHex()[:8]
	b.minio.MakeBucket(name)
	return b.minio.BucketURL(name, "")
}

func randHex() string {
	buf := make([]byte, 8)
	rand.Read(buf)
	return hex.EncodeToString(buf)
}

// fakeHash is a valid, distinct store path hash for i.
func fakeHash(i int) string {
	d := make([]byte, 20)
	copy(d, strconv.Itoa(i))
	return nixbase32.EncodeToString(d)
}

func runtimeGOROOT() string {
	out, err := exec.Command("go", "env", "GOROOT").Output()
	if err != nil {
		return "/usr/local/go"
	}
	return strings.TrimSpace(string(out))
}

func narSize(env []string, p string) (int64, error) {
	cmd := exec.Command("nix-store", "-q", "--size", p)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func parallel(workers, n int, f func(i int) error) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	next := make(chan int)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

func stringsReader(s string) io.Reader { return strings.NewReader(s) }
