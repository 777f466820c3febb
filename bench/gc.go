package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/audit"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/cachegc"
)

// gcSection: garbage collection cycles over a bucket of 20,000 narinfos
// (with their NARs) on MinIO: the first run reads every narinfo, the
// second, over the unchanged bucket, only lists (the reference cache knows
// every ETag); then a cycle that deletes everything. Baselines: an audit
// of the same bucket (which reads every narinfo too), and the first run.
func init() {
	register("gc", "garbage collection of a bucket of 20,000 narinfos: first run, unchanged second run, a cycle deleting everything", (*bench).gcSection)
}

func (b *bench) gcSection() error {
	const n = 20000
	fmt.Fprintf(os.Stderr, "garbage collection over %d narinfos\n", n)
	if _, err := b.startMinIO(); err != nil {
		return err
	}
	bu, c, err := b.freshBucket()
	if err != nil {
		return err
	}
	ctx := context.Background()
	// A random DAG: each path refers to up to three earlier ones, which
	// keeps it about as shallow as real closures.
	rng := rand.New(rand.NewPCG(1, 2))
	refs := make([][]int, n)
	for i := range refs {
		for j := 0; j < 3 && i > 0; j++ {
			refs[i] = append(refs[i], rng.IntN(i))
		}
	}
	name := func(i int) string { return fakeHash(i) + "-gc-bench-" + fmt.Sprint(i) }
	if _, err := bu.Put(ctx, "nix-cache-info", stringsReader("StoreDir: /nix/store\n"), 21, bucket.PutOptions{}); err != nil {
		return err
	}
	t0 := time.Now()
	if err := parallel(32, n, func(i int) error {
		nar := cachefmt.Keys.NAR(fakeHash(n+i)+fakeHash(2*n + i)[:20], ".zst")
		var rs []string
		for _, r := range refs[i] {
			rs = append(rs, name(r))
		}
		sort.Strings(rs)
		ni := fmt.Sprintf("StorePath: /nix/store/%s\nURL: %s\nCompression: zstd\nFileHash: sha256:%s\nFileSize: 100\nNarHash: sha256:%s\nNarSize: 300\nReferences: %s\nDeriver: %s.drv\nSig: bench-1:%s==\n",
			name(i), nar, fakeHash(3*n+i)+fakeHash(4*n + i)[:20], fakeHash(5*n+i)+fakeHash(6*n + i)[:20], strings.Join(rs, " "), fakeHash(7*n+i)+"-gc-bench", strings.Repeat("A", 86))
		if _, err := bu.Put(ctx, nar, stringsReader(strings.Repeat("x", 100)), 100, bucket.PutOptions{}); err != nil {
			return err
		}
		_, err := bu.Put(ctx, cachefmt.Keys.Narinfo(fakeHash(i)), stringsReader(ni), int64(len(ni)), bucket.PutOptions{ContentType: "text/x-nix-narinfo"})
		return err
	}); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "  filled the bucket in %s\n", time.Since(t0).Round(time.Second))

	t0 = time.Now()
	arep, err := audit.Run(ctx, bu, audit.Options{})
	if err != nil {
		return err
	}
	auditDur := time.Since(t0)
	if !arep.OK() {
		return fmt.Errorf("the bench bucket is not healthy: %s", arep.Summary())
	}
	cache, err := cachegc.OpenRefCache(filepath.Join(b.work, "gc.db"), c.Identity())
	if err != nil {
		return err
	}
	defer cache.Close()
	opt := cachegc.Options{KeepSince: 24 * time.Hour, Grace: time.Minute, Agent: "bench", Host: "bench", Cache: cache}
	first, err := cachegc.Run(ctx, bu, opt)
	if err != nil {
		return err
	}
	second, err := cachegc.Run(ctx, bu, opt)
	if err != nil {
		return err
	}
	if first.Live != n || second.Live != n || first.Doomed.Objects() != 0 {
		return fmt.Errorf("unexpected marks: %s / %s", first.Summary(), second.Summary())
	}
	fmt.Fprintf(os.Stderr, "  first:  %s\n  second: %s\n", first.Summary(), second.Summary())
	add(Row{Name: "gc cycle, 20,000 narinfos + NARs, first run", Value: first.Duration.Seconds(), Unit: "s",
		Baseline: "audit of the same bucket (reads every narinfo)", BaseVal: auditDur.Seconds()})
	add(Row{Name: "gc first run: GET requests", Value: float64(first.Requests.Get), Unit: "requests",
		Baseline: "narinfos in the bucket", BaseVal: n})
	add(Row{Name: "gc cycle, same bucket unchanged, second run", Value: second.Duration.Seconds(), Unit: "s",
		Baseline: "first run", BaseVal: first.Duration.Seconds(), Target: "listings only"})
	add(Row{Name: "gc second run: GET requests", Value: float64(second.Requests.Get), Unit: "requests",
		Baseline: "first run's GETs", BaseVal: float64(first.Requests.Get), Target: "≤ 2 (lease)"})
	add(Row{Name: "gc second run: LIST requests", Value: float64(second.Requests.List), Unit: "requests",
		Baseline: "objects / 1,000", BaseVal: float64(2*n+1) / 1000})

	// Everything goes: retention 0, a short grace.
	opt.KeepSince, opt.Grace = 0, 5*time.Second
	del, err := cachegc.Run(ctx, bu, opt)
	if err != nil {
		return err
	}
	if del.Deleted.Narinfos != n || del.Deleted.NARs != n {
		return fmt.Errorf("deleting cycle: %s", del.Summary())
	}
	fmt.Fprintf(os.Stderr, "  delete: %s\n", del.Summary())
	work := del.Duration - opt.Grace
	add(Row{Name: "gc cycle deleting 20,000 narinfos + NARs (without the 5 s grace)", Value: work.Seconds(), Unit: "s",
		Baseline: "first run (reads, deletes nothing)", BaseVal: first.Duration.Seconds()})
	add(Row{Name: "gc deleting cycle: DELETE requests", Value: float64(del.Requests.Delete), Unit: "requests",
		Baseline: "objects deleted / 1,000", BaseVal: float64(del.Deleted.Objects()) / 1000})
	return nil
}
