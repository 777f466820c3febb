package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
)

var (
	memTinyPaths = flag.Int("memtiny-paths", 10000, "memtiny: paths in the closure (top included)")
	hugeGB       = flag.Float64("huge-gb", 5, "mem5g: size of the path in GB (0 leaves the row out)")
)

// memTiny: one closure of 10,000 tiny paths pushed to local MinIO: agentd's
// peak RSS and the time, against stock `nix copy` of the same closure to a
// local file:// cache.
func (b *bench) memTiny() error {
	n := *memTinyPaths
	fmt.Fprintf(os.Stderr, "one closure of %d tiny paths → MinIO\n", n)
	cl, err := importClosure(b.env, "bench-memtiny-"+randHex()[:6], n-1, 100, false)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, cl.All())

	dst := filepath.Join(b.work, "memtiny-nixcopy")
	t0 := time.Now()
	nixRSS, err := b.nixCopy("file://"+dst+"?compression=zstd", []string{cl.Top})
	if err != nil {
		return err
	}
	nixTime := time.Since(t0)
	os.RemoveAll(dst)

	m, _ := b.startMinIO()
	name := b.bucketName()
	m.MakeBucket(name)
	r, err := b.measuredPush("memtiny", m.BucketURL(name, ""), m.Env(), []string{cl.Top}, 30*time.Minute, nil)
	if err != nil {
		return err
	}
	took, idle, rss := r.took, r.idle, r.peak
	if got := b.countKeys(name, ".narinfo"); got != n {
		return fmt.Errorf("%d narinfos in the bucket, want %d", got, n)
	}
	add(Row{Name: fmt.Sprintf("agentd peak RSS, one closure of %d tiny paths", n), Value: rss, Unit: "MiB", Baseline: "agentd before the push", BaseVal: idle, Target: "≤ 200 MiB"})
	add(Row{Name: "  stock nix copy peak RSS, same closure to file://", Value: nixRSS, Unit: "MiB", Baseline: "agentd peak RSS", BaseVal: rss})
	add(Row{Name: fmt.Sprintf("  push of the %d-path closure → MinIO", n), Value: took.Seconds(), Unit: "s", Baseline: "nix copy to file:// (local disk, no HTTP)", BaseVal: nixTime.Seconds(), LowerIsBetter: true})
	return nil
}

// memHuge: agentd's peak RSS while uploading one incompressible path of
// -huge-gb GB to local MinIO. At its peak the disk holds the path in the
// store, agentd's compressed temp file and MinIO's copy; the row is left out
// (with a row saying so) when the disk has less free space than that.
func (b *bench) memHuge() error {
	size := int64(*hugeGB * 1e9)
	if size <= 0 {
		fmt.Fprintln(os.Stderr, "huge path left out (-huge-gb 0)")
		return nil
	}
	need := 3*size + 2e9
	free, err := freeBytes("/nix/store", b.work)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "agentd peak RSS with a %.1f GB incompressible path (free disk %.1f GB, need %.1f GB)\n", float64(size)/1e9, float64(free)/1e9, float64(need)/1e9)
	add(Row{Name: "free disk before the huge-path row", Value: float64(free) / 1e9, Unit: "GB", Baseline: "needed: 3 × size + 2 GB", BaseVal: float64(need) / 1e9})
	if free < need {
		fmt.Fprintln(os.Stderr, "  left out: not enough free disk")
		return nil
	}

	dir := filepath.Join(b.work, "huge5-"+randHex())
	os.MkdirAll(dir, 0o755)
	buf := make([]byte, 64<<20)
	for i, left := 0, size; left > 0; i++ {
		n := min(left, int64(len(buf)))
		rand.Read(buf[:n])
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("part-%03d", i)), buf[:n], 0o644); err != nil {
			os.RemoveAll(dir)
			return err
		}
		left -= n
	}
	paths, err := nixStoreAdd(b.env, dir)
	os.RemoveAll(dir)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, paths)
	narBytes, err := narSize(b.env, paths[0])
	if err != nil {
		return err
	}

	m, _ := b.startMinIO()
	name := b.bucketName()
	m.MakeBucket(name)
	defer b.emptyBucket(name)
	r, err := b.measuredPush("huge5", m.BucketURL(name, ""), m.Env(), paths, 2*time.Hour, nil)
	if err != nil {
		return err
	}
	add(Row{Name: fmt.Sprintf("agentd peak RSS, one %.1f GB incompressible path", float64(narBytes)/1e9), Value: r.peak, Unit: "MiB", Baseline: "agentd before the push", BaseVal: r.idle, Target: "≤ 200 MiB"})
	add(Row{Name: "  its upload → MinIO", Value: float64(narBytes) / 1e6 / r.took.Seconds(), Unit: "MB/s", Baseline: "", BaseVal: 0})
	return nil
}

// pushRun is what measuredPush measured.
type pushRun struct {
	took       time.Duration
	idle, peak float64 // agentd's RSS before the push and its peak, MiB
}

// measuredPush starts an agentd on cacheURL, lets it write nix-cache-info,
// runs before (if set), pushes paths as one job and waits until it is
// uploaded; then it stops agentd.
func (b *bench) measuredPush(label, cacheURL string, env, paths []string, timeout time.Duration, before func()) (pushRun, error) {
	sock, cmdA, err := b.agent(label+"-"+randHex()[:6], cacheURL, env)
	if err != nil {
		return pushRun{}, err
	}
	defer stop(cmdA)
	if err := b.ensureCacheInfo(sock); err != nil {
		return pushRun{}, err
	}
	r := pushRun{idle: peakRSS(cmdA.Process.Pid)}
	if before != nil {
		before()
	}
	t0 := time.Now()
	if err := push(sock, paths); err != nil {
		return pushRun{}, err
	}
	if err := waitUploaded(sock, 1, timeout); err != nil {
		return pushRun{}, err
	}
	r.took = time.Since(t0)
	r.peak = peakRSS(cmdA.Process.Pid)
	return r, nil
}

// freeBytes is the least free space among the directories' file systems
// (the need is counted as if all the files were on one).
func freeBytes(dirs ...string) (int64, error) {
	var least int64 = -1
	for _, d := range dirs {
		var st syscall.Statfs_t
		if err := syscall.Statfs(d, &st); err != nil {
			return 0, fmt.Errorf("statfs %s: %w", d, err)
		}
		free := int64(st.Bavail) * st.Bsize
		if least < 0 || free < least {
			least = free
		}
	}
	return least, nil
}

// emptyBucket deletes a bucket's objects (to give the disk back early).
func (b *bench) emptyBucket(name string) {
	c := b.minio.Client()
	ctx := context.Background()
	objs := c.ListObjects(ctx, name, minio.ListObjectsOptions{Recursive: true})
	for e := range c.RemoveObjects(ctx, name, objs, minio.RemoveObjectsOptions{}) {
		fmt.Fprintf(os.Stderr, "  (cleanup: remove %s: %v)\n", e.ObjectName, e.Err)
	}
}
