package nixroots

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixspool/nixspool/internal/atomicfile"
)

func TestRoots(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "roots")
	r, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	a, b := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"
	for i := 0; i < 2; i++ { // idempotent
		if err := r.Add(a); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := os.Readlink(filepath.Join(dir, filepath.Base(a))); got != a {
		t.Fatalf("root points at %q", got)
	}
	added, removed, err := r.Reconcile(Named([]string{b}), 0)
	if err != nil || added != 1 || removed != 1 {
		t.Fatalf("Reconcile = %d, %d, %v", added, removed, err)
	}
	if err := r.Remove(b); err != nil {
		t.Fatal(err)
	}
	if err := r.Remove(b); err != nil {
		t.Fatal("second Remove failed")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left %v", ents)
	}
	off, _ := New("")
	if off.Enabled() || off.Add(a) != nil {
		t.Fatal("disabled roots did something")
	}
}

// TestReconcileSparesYoungRoots: a root made a moment ago (by a hook about
// to spool its request) survives reconciliation; an old one does not.
func TestReconcileSparesYoungRoots(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "roots")
	r, _ := New(dir)
	old, young := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-old", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-young"
	if err := r.AddAll([]string{old, young}); err != nil {
		t.Fatal(err)
	}
	hourAgo := time.Now().Add(-time.Hour)
	if err := lchtimes(filepath.Join(dir, filepath.Base(old)), hourAgo); err != nil {
		t.Fatal(err)
	}
	_, removed, err := r.Reconcile(nil, time.Minute)
	if err != nil || removed != 1 {
		t.Fatalf("Reconcile = %d removed, %v", removed, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, filepath.Base(young))); err != nil {
		t.Fatalf("young root removed: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, filepath.Base(old))); err == nil {
		t.Fatal("old root kept")
	}
}

func lchtimes(path string, t time.Time) error {
	ts := []unix.Timespec{unix.NsecToTimespec(t.UnixNano()), unix.NsecToTimespec(t.UnixNano())}
	return unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// BenchmarkAdd roots one new path per operation (a symlink, a rename and
// a directory fsync): what rooting adds to each hook's request.
func BenchmarkAdd(b *testing.B) {
	r, err := New(filepath.Join(b.TempDir(), "roots"))
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; b.Loop(); i++ {
		if err := r.Add(fmt.Sprintf("/nix/store/%032d-p", i)); err != nil {
			b.Fatal(err)
		}
	}
}

// TestConcurrentAddsShareDirSyncs: roots added while the directory is being
// synced share the next sync instead of one each, and a failed sync fails
// the adds that needed it.
func TestConcurrentAddsShareDirSyncs(t *testing.T) {
	r, err := New(filepath.Join(t.TempDir(), "roots"))
	if err != nil {
		t.Fatal(err)
	}
	held, release := make(chan struct{}), make(chan struct{})
	first := true
	r.sync.syncDir = func(dir string) error {
		if first { // only the syncing caller runs this
			first = false
			held <- struct{}{}
			<-release
		}
		return atomicfile.SyncDir(dir)
	}
	const n = 32
	errs := make(chan error, n)
	add := func(i int) { errs <- r.Add(fmt.Sprintf("/nix/store/%032d-p", i)) }
	go add(0)
	select {
	case <-held:
	case <-time.After(20 * time.Second):
		t.Fatal("first sync did not start")
	}
	for i := 1; i < n; i++ {
		go add(i)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		r.sync.mu.Lock()
		w := r.sync.waiting
		r.sync.mu.Unlock()
		if w == n-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d adds waiting, want %d", w, n-1)
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if r.sync.count != 2 {
		t.Errorf("%d concurrent adds made %d directory syncs, want 2", n, r.sync.count)
	}
	for i := 0; i < n; i++ {
		p := fmt.Sprintf("/nix/store/%032d-p", i)
		if got, _ := os.Readlink(filepath.Join(r.Dir(), filepath.Base(p))); got != p {
			t.Errorf("root of %s points at %q", p, got)
		}
	}

	r.sync.syncDir = func(string) error { return unix.EIO }
	if err := r.Add("/nix/store/00000000000000000000000000000000-failed"); err == nil {
		t.Error("an add whose directory sync failed succeeded")
	}
}
