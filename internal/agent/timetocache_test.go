package agent

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/metrics"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/uploader"
	"github.com/nixspool/nixspool/storepath"
)

// cachedAgent is testAgent whose store knows no path (the fakeStore is
// empty) and whose cache already holds the narinfos of paths: a job for
// one of them is done as soon as the cache is found to hold it.
func cachedAgent(t *testing.T, paths ...string) *Agent {
	t.Helper()
	a := testAgent(t)
	fs := &fakeStore{valid: map[string]bool{}}
	a.intake.store = fs
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "cache")
	for _, p := range paths {
		writeNarinfoIn(t, cacheDir, p)
	}
	c, _ := cacheurl.Parse("file://" + cacheDir)
	a.cache = c
	a.breaker = newBreaker(a.backoff)
	a.setRealiser(realisation.New(realisation.Options{}))
	fb, err := filebucket.New(c.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if a.uploader, err = uploader.New(uploader.Options{Bucket: fb, Cache: c, TempDir: filepath.Join(dir, "tmp"), Store: fs}); err != nil {
		t.Fatal(err)
	}
	return a
}

// writeNarinfoIn puts a narinfo for p into the file cache at dir.
func writeNarinfoIn(t *testing.T, dir, p string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ni := "StorePath: " + p + "\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:0000000000000000000000000000000000000000000000000000\nNarSize: 1\n"
	if err := os.WriteFile(filepath.Join(dir, storepath.HashPart(p)+".narinfo"), []byte(ni), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeNarinfo puts a narinfo for p into a's cache.
func writeNarinfo(t *testing.T, a *Agent, p string) { writeNarinfoIn(t, a.cache.Dir, p) }

// TestTimeToCacheInStatus: every job done adds its time from the
// acknowledgement to the narinfo being in the cache to status (p50/p99)
// and to the Prometheus histogram.
func TestTimeToCacheInStatus(t *testing.T) {
	paths := []string{
		"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-one",
		"/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-two",
		"/nix/store/cccccccccccccccccccccccccccccccc-three",
	}
	a := cachedAgent(t, paths...)
	a.metrics = metrics.New(func() (metrics.Snapshot, error) { return metrics.Snapshot{}, nil })
	addr, err := a.metrics.Serve("127.0.0.1:0", a.log)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := a.status(); err != nil || st.TimeToCache.Paths != 0 {
		t.Fatalf("status before any upload: %+v, %v", st.TimeToCache, err)
	}
	// Acknowledged 2s, 2s and 20s ago.
	now := time.Now()
	for i, p := range paths {
		ago := 2 * time.Second
		if i == 2 {
			ago = 20 * time.Second
		}
		if _, err := a.queue.Enqueue([]string{p}, "", now.Add(-ago)); err != nil {
			t.Fatal(err)
		}
	}
	for range paths {
		job, err := a.queue.Lease(time.Now())
		if err != nil || job == nil {
			t.Fatalf("lease: %v, %v", job, err)
		}
		a.process(job)
	}
	waitFor(t, "the jobs to be done", func() bool {
		s, err := a.queue.Stats()
		return err == nil && s.Uploaded == 3
	})
	st, err := a.status()
	if err != nil {
		t.Fatal(err)
	}
	ttc := st.TimeToCache
	if ttc.Paths != 3 || ttc.P50Seconds < 1.9 || ttc.P50Seconds > 2.5 || ttc.P99Seconds < 19 || ttc.P99Seconds > 22 {
		t.Fatalf("time to cache = %+v, want 3 paths, p50 about 2s, p99 about 20s", ttc)
	}

	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(body), "nixspool_time_to_cache_seconds_count 3") {
		t.Fatalf("metrics lack the time-to-cache histogram of 3 paths:\n%s", grepLines(string(body), "time_to_cache"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
