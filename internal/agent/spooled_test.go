package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixspool/nixspool/cacheurl"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/nixroots"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/uploader"
	"github.com/nixspool/nixspool/storepath"
)

// testAgent is an Agent with a real queue, GC roots and spool directory,
// and an uploader on a local directory; nothing that talks to Nix.
func testAgent(t *testing.T) *Agent {
	t.Helper()
	dir := t.TempDir()
	a := &Agent{cfg: Config{StateDir: filepath.Join(dir, "state"), StoreDir: storepath.DefaultStoreDir}, log: slog.New(slog.DiscardHandler), now: time.Now}
	var err error
	if a.queue, err = queue.Open(filepath.Join(a.cfg.StateDir, "queue.db")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.queue.Close() })
	roots, err := nixroots.New(filepath.Join(dir, "roots"))
	if err != nil {
		t.Fatal(err)
	}
	a.realiser = realisation.New(realisation.Options{})
	a.assemble(roots, &fakeStore{})
	c, _ := cacheurl.Parse("file://" + filepath.Join(dir, "cache"))
	fb, err := filebucket.New(c.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if a.uploader, err = uploader.New(uploader.Options{Bucket: fb, Cache: c, TempDir: filepath.Join(dir, "tmp")}); err != nil {
		t.Fatal(err)
	}
	a.uploadCtx, a.stopUploads = context.WithCancel(context.Background())
	t.Cleanup(a.stopUploads)
	a.jobs = newJobRunner(a.uploadCtx, a.queue, a.roots, a.uploader, a.log)
	return a
}

// setRealiser gives the agent and its intake r.
func (a *Agent) setRealiser(r *realisation.Realiser) {
	a.realiser = r
	a.intake.realiser = r
}

// setLog gives the agent and its parts log.
func (a *Agent) setLog(log *slog.Logger) {
	a.log = log
	a.intake.log, a.roots.log, a.spool.log, a.spoolImport.log, a.jobs.log = log, log, log, log, log
}

func age(t *testing.T, path string, d time.Duration) {
	t.Helper()
	at := time.Now().Add(-d).UnixNano()
	ts := []unix.Timespec{unix.NsecToTimespec(at), unix.NsecToTimespec(at)}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		t.Fatal(err)
	}
}

// TestRecoverKeepsSpooledRoots: start-up reconciliation of GC roots keeps
// the roots of queued paths and of paths waiting in the spool (the hook
// rooted them), and removes the others.
func TestRecoverKeepsSpooledRoots(t *testing.T) {
	a := testAgent(t)
	queued := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-queued"
	spooled := "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-spooled"
	stale := "/nix/store/cccccccccccccccccccccccccccccccc-stale"
	if _, err := a.queue.Enqueue([]string{queued}, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{spooled}}); err != nil {
		t.Fatal(err)
	}
	if err := a.roots.dir.AddAll([]string{spooled, stale}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{spooled, stale} {
		age(t, filepath.Join(a.roots.dir.Dir(), filepath.Base(p)), time.Hour)
	}
	if err := a.roots.reconcile(); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{queued: true, spooled: true, stale: false} {
		_, err := os.Lstat(filepath.Join(a.roots.dir.Dir(), filepath.Base(p)))
		if (err == nil) != want {
			t.Errorf("root of %s: exists=%v, want %v", p, err == nil, want)
		}
	}
}

// TestStatusCountsSpool: status reports the requests waiting in the spool.
func TestStatusCountsSpool(t *testing.T) {
	a := testAgent(t)
	a.breaker = newBreaker(a.backoff)
	a.cache, _ = cacheurl.Parse("file:///cache")
	before := time.Now()
	spool.Write(a.spoolDir(), spool.Entry{Paths: []string{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"}})
	spool.Write(a.spoolDir(), spool.Entry{Paths: []string{"/nix/store/cccccccccccccccccccccccccccccccc-c"}})
	for i := 0; i < 2; i++ { // the second time from the cache
		s, err := a.status()
		if err != nil {
			t.Fatal(err)
		}
		if s.Spooled.Files != 2 || s.Spooled.Paths != 3 || s.Spooled.OldestAt < before.Unix() || s.Spooled.OldestAt > time.Now().Unix() {
			t.Fatalf("spooled = %+v", s.Spooled)
		}
	}
}

// enqueue queues paths as a request does: parsed, then through the intake.
func (a *Agent) enqueue(ctx context.Context, raw []string, rawDrv string, source queue.Source) ([]queue.EnqueueResult, error) {
	paths, drv, err := parseRequest(a.cfg.StoreDir, raw, rawDrv)
	if err != nil {
		return nil, err
	}
	return a.intake.request(ctx, intake{paths: paths, drv: drv, source: source})
}
