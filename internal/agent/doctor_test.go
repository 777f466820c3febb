package agent

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/open"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/protocol"
)

// writeCounter counts the writes that reach a bucket.
type writeCounter struct {
	bucket.Bucket
	mu     sync.Mutex
	writes []string
}

func (w *writeCounter) note(op, key string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, op+" "+key)
}

func (w *writeCounter) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	w.note("put", key)
	return w.Bucket.Put(ctx, key, r, size, opts)
}

func (w *writeCounter) Delete(ctx context.Context, key string) error {
	w.note("delete", key)
	return w.Bucket.Delete(ctx, key)
}

func (w *writeCounter) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.writes)
}

// TestDoctorWritesOnlyForOperators: doctor probes writes (a probe object
// in the cache, the collector's store checks, a GC root, a file in the
// state directory) only for an operator; for anyone else who may connect
// (a pusher) it writes nothing, says so, and still runs the checks that
// only read.
func TestDoctorWritesOnlyForOperators(t *testing.T) {
	a := testAgent(t)
	c, err := cacheurl.Parse("file://" + filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	a.cache = c
	fb, err := open.Cache(c)
	if err != nil {
		t.Fatal(err)
	}
	body := "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
	if _, err := fb.Put(context.Background(), "nix-cache-info", strings.NewReader(body), int64(len(body)), bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	wc := &writeCounter{Bucket: fb}
	a.bucket, a.limited = wc, wc
	a.store = nixstore.Open(nixstore.Options{Socket: filepath.Join(t.TempDir(), "no-daemon.sock")})
	a.filter = testFilter(a.cfg)
	a.access = access{ownUID: 4242, socket: group{gid: 4243, set: true}}
	if a.gc, err = newGCAgent(a.gcDeps()); err != nil {
		t.Fatal(err)
	}
	pusher := peer{known: true, uid: 5000, groups: []int{4243}}
	root := peer{known: true, uid: 0}
	if a.access.operator(pusher) || !a.access.operator(root) {
		t.Fatal("the test's peers are not what they claim")
	}
	mtimes := func() string {
		var s []string
		for _, d := range []string{a.cfg.StateDir, a.roots.dir.Dir()} {
			fi, err := os.Stat(d)
			if err != nil {
				t.Fatal(err)
			}
			s = append(s, fi.ModTime().String())
		}
		return strings.Join(s, " ")
	}
	find := func(checks []protocol.Check, name string) *protocol.Check {
		for i := range checks {
			if checks[i].Name == name {
				return &checks[i]
			}
		}
		return nil
	}

	if err := os.MkdirAll(a.roots.dir.Dir(), 0o755); err != nil {
		t.Fatal(err)
	}
	before := mtimes()
	checks := a.doctorOf().run(context.Background(), a.access.operator(pusher))
	if n := wc.count(); n != 0 {
		t.Errorf("doctor for a pusher wrote to the cache: %v", wc.writes)
	}
	if after := mtimes(); after != before {
		t.Errorf("doctor for a pusher wrote in the state directory or the GC roots (mtimes %s, then %s)", before, after)
	}
	if ch := find(checks, "write probes"); ch == nil || !strings.Contains(ch.Detail, "not run") {
		t.Errorf("doctor for a pusher does not say that writes were not probed: %+v", checks)
	}
	if ch := find(checks, "nix-cache-info"); ch == nil || ch.Status != "ok" {
		t.Errorf("doctor for a pusher did not read nix-cache-info: %+v", checks)
	}

	checks = a.doctorOf().run(context.Background(), a.access.operator(root))
	if n := wc.count(); n == 0 {
		t.Error("doctor for root made no write probe of the cache")
	}
	if ch := find(checks, "cache"); ch == nil || ch.Status != "ok" || !strings.Contains(ch.Detail, "put, head and delete") {
		t.Errorf("doctor for root: cache check %+v", ch)
	}
	if ch := find(checks, "write probes"); ch != nil {
		t.Errorf("doctor for root says writes were not probed: %+v", ch)
	}
}
