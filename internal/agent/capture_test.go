package agent

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storepath"
	_ "modernc.org/sqlite"
)

// nixDB is a database laid out as Nix's (schema 10), in a directory of its
// own, that a test adds rows to.
type nixDB struct {
	t   *testing.T
	dir string
	w   *sql.DB
}

func newNixDB(t *testing.T) *nixDB {
	t.Helper()
	d := &nixDB{t: t, dir: t.TempDir()}
	d.create()
	return d
}

func (d *nixDB) create() {
	if err := os.WriteFile(filepath.Join(d.dir, "schema"), []byte("10"), 0o644); err != nil {
		d.t.Fatal(err)
	}
	w, err := sql.Open("sqlite", "file:"+filepath.Join(d.dir, "db.sqlite"))
	if err != nil {
		d.t.Fatal(err)
	}
	w.SetMaxOpenConns(1)
	d.t.Cleanup(func() { w.Close() })
	if _, err := w.Exec(`create table ValidPaths (id integer primary key autoincrement not null, path text unique not null,
		hash text not null, registrationTime integer not null, deriver text, narSize integer, ultimate integer, sigs text, ca text);
		pragma journal_mode = wal;`); err != nil {
		d.t.Fatal(err)
	}
	d.w = w
}

// reset replaces the database with an empty one.
func (d *nixDB) reset() {
	d.w.Close()
	for _, f := range []string{"db.sqlite", "db.sqlite-wal", "db.sqlite-shm"} {
		os.Remove(filepath.Join(d.dir, f))
	}
	d.create()
}

// add registers a path of kind built (ultimate), added (content-addressed,
// unsigned) or substituted (signed by upstream-1), valid in fs too, and
// returns it.
func (d *nixDB) add(fs *fakeStore, name, kind string) string {
	d.t.Helper()
	p := "/nix/store/" + strings.Repeat(string(rune('a'+len(fs.valid)%20)), 32) + "-" + name
	var ultimate, sigs, ca any
	switch kind {
	case "built":
		ultimate = 1
	case "added":
		ca = "fixed:r:sha256:0000"
	case "substituted":
		sigs = "upstream-1:c2ln"
	}
	if _, err := d.w.Exec(`insert into ValidPaths (path, hash, registrationTime, ultimate, sigs, ca) values (?, 'sha256:00', 1700000000, ?, ?, ?)`,
		p, ultimate, sigs, ca); err != nil {
		d.t.Fatal(err)
	}
	fs.mu.Lock()
	fs.valid[p] = true
	fs.mu.Unlock()
	return p
}

func captureAgent(t *testing.T, fs *fakeStore, skipSignedBy ...string) *Agent {
	a := testAgent(t)
	a.intake.store = fs
	a.cfg.SkipSignedBy = skipSignedBy
	a.filter = testFilter(a.cfg)
	return a
}

func startCapturer(t *testing.T, a *Agent, db *nixDB, mode CaptureMode) *capturer {
	t.Helper()
	c, err := newCapturer(a.captureDeps(), mode, db.dir, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.db.Close() })
	return c
}

func cycle(t *testing.T, c *capturer) int {
	t.Helper()
	n, err := c.cycle(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func queuedBy(t *testing.T, a *Agent, src queue.Source) []string {
	t.Helper()
	jobs, err := a.queue.ListBy("", &src, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, j := range jobs {
		out = append(out, j.Path)
	}
	slices.Sort(out)
	return out
}

func sorted(s ...string) []string { slices.Sort(s); return s }

// In local mode the watcher queues what was built or added here, not what
// was substituted nor derivations; the cursor is durable, so a second
// cycle and a restart queue nothing again.
func TestCaptureLocal(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	built := db.add(fs, "built", "built")
	added := db.add(fs, "added", "added")
	db.add(fs, "substituted", "substituted")
	db.add(fs, "x.drv", "added")
	a := captureAgent(t, fs)
	c := startCapturer(t, a, db, CaptureLocal)
	if n := cycle(t, c); n != 2 {
		t.Fatalf("first cycle queued %d paths, want 2", n)
	}
	if got, want := queuedBy(t, a, queue.SourceCapture), sorted(built, added); !slices.Equal(got, want) {
		t.Fatalf("captured %v, want %v", got, want)
	}
	if n := cycle(t, c); n != 0 {
		t.Fatalf("idle cycle queued %d", n)
	}
	// A restart resumes at the cursor.
	c2 := startCapturer(t, a, db, CaptureLocal)
	if n := cycle(t, c2); n != 0 {
		t.Fatalf("cycle after restart queued %d paths, want 0", n)
	}
	later := db.add(fs, "later", "built")
	if n := cycle(t, c2); n != 1 {
		t.Fatalf("cycle after a new path queued %d, want 1", n)
	}
	if got := queuedBy(t, a, queue.SourceCapture); !slices.Contains(got, later) {
		t.Fatalf("%s not captured: %v", later, got)
	}
	if err := a.queue.Check(); err != nil {
		t.Fatal(err)
	}
}

// Without --capture-existing the first start begins at the store's top.
func TestCaptureNotExisting(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	db.add(fs, "before", "built")
	a := captureAgent(t, fs)
	c := startCapturer(t, a, db, CaptureLocal)
	c.existing = false
	if n := cycle(t, c); n != 0 {
		t.Fatalf("first cycle queued %d paths already in the store", n)
	}
	// Registered while agentd is down, before any cycle found something:
	// found at the next start.
	after := db.add(fs, "after", "built")
	c2 := startCapturer(t, a, db, CaptureLocal)
	c2.existing = false
	if cycle(t, c2); !slices.Equal(queuedBy(t, a, queue.SourceCapture), []string{after}) {
		t.Fatalf("captured %v, want %s", queuedBy(t, a, queue.SourceCapture), after)
	}
}

// In all mode substituted paths are queued too, unless signed by a
// --skip-signed-by key; widening the mode reads the store again.
func TestCaptureAllAndSkipSignedBy(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	built := db.add(fs, "built", "built")
	sub := db.add(fs, "substituted", "substituted")

	skipping := captureAgent(t, fs, "upstream-1")
	if cycle(t, startCapturer(t, skipping, db, CaptureAll)); !slices.Equal(queuedBy(t, skipping, queue.SourceCapture), []string{built}) {
		t.Fatalf("with --skip-signed-by upstream-1: captured %v", queuedBy(t, skipping, queue.SourceCapture))
	}

	a := captureAgent(t, fs)
	cycle(t, startCapturer(t, a, db, CaptureLocal))
	if got := queuedBy(t, a, queue.SourceCapture); !slices.Equal(got, []string{built}) {
		t.Fatalf("local: captured %v", got)
	}
	if n := cycle(t, startCapturer(t, a, db, CaptureAll)); n != 2 {
		t.Fatalf("widened to all: handed %d paths to the queue, want 2 (the store read again)", n)
	}
	if got, want := queuedBy(t, a, queue.SourceCapture), sorted(built, sub); !slices.Equal(got, want) {
		t.Fatalf("all: captured %v, want %v", got, want)
	}
}

// Paths that are no longer valid (collected since) are left out, and the
// cursor moves past them; a path the hook queued keeps its source.
func TestCaptureSkipsInvalidAndKeepsSource(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	gone := db.add(fs, "gone", "built")
	hooked := db.add(fs, "hooked", "built")
	delete(fs.valid, gone)
	a := captureAgent(t, fs)
	if _, err := a.enqueue(context.Background(), []string{hooked}, "", queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	c := startCapturer(t, a, db, CaptureLocal)
	cycle(t, c)
	if got := queuedBy(t, a, queue.SourceCapture); len(got) != 0 {
		t.Fatalf("captured %v, want nothing", got)
	}
	if got := queuedBy(t, a, queue.SourceHook); !slices.Equal(got, []string{hooked}) {
		t.Fatalf("hook jobs %v", got)
	}
	if st := c.status(); st.Cursor != 2 {
		t.Fatalf("cursor %d, want 2", st.Cursor)
	}
}

// A database whose numbering restarted below the cursor is read from its
// beginning; what is queued already is not queued twice.
func TestCaptureResetDatabase(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	for i := range 5 {
		db.add(fs, fmt.Sprintf("old%d", i), "built")
	}
	a := captureAgent(t, fs)
	c := startCapturer(t, a, db, CaptureLocal)
	cycle(t, c)
	db.reset()
	fresh := db.add(fs, "fresh", "built")
	if n := cycle(t, c); n != 1 {
		t.Fatalf("after the reset: queued %d, want 1", n)
	}
	if got := queuedBy(t, a, queue.SourceCapture); len(got) != 6 || !slices.Contains(got, fresh) {
		t.Fatalf("captured %v", got)
	}
	if st := c.status(); st.Cursor != 1 {
		t.Fatalf("cursor %d after reset, want 1", st.Cursor)
	}
}

// A database of a schema the watcher does not know leaves capture off,
// with the reason in status; agentd goes on.
func TestCaptureUnknownSchema(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	os.WriteFile(filepath.Join(db.dir, "schema"), []byte("11"), 0o644)
	a := captureAgent(t, fs)
	a.cfg.Capture, a.cfg.NixDBDir, a.cfg.CaptureInterval = CaptureLocal, db.dir, 1
	a.startCapture()
	st := a.captureStatus()
	if a.capture != nil || st == nil || !strings.Contains(st.Error, "schema version 11") {
		t.Fatalf("capture status %+v", st)
	}
}

// Requests record their source: the hook's enqueue "hook", agentctl push
// "push"; list filters by it and status counts by it.
func TestRequestSources(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	a := captureAgent(t, fs)
	a.setRealiser(realisation.New(realisation.Options{}))
	a.cache, _ = cacheurl.Parse("file:///nonexistent")
	a.breaker = newBreaker(a.backoff)
	hooked := "/nix/store/" + strings.Repeat("h", 32) + "-hooked"
	pushed := "/nix/store/" + strings.Repeat("p", 32) + "-pushed"
	fs.valid[hooked], fs.valid[pushed] = true, true
	for _, r := range []*protocol.Request{{Op: protocol.OpEnqueue, Paths: []string{hooked}}, {Op: protocol.OpPush, Paths: []string{pushed}}} {
		if resp := a.serveRequest(context.Background(), r, peer{}, nil); resp.Error != "" {
			t.Fatal(resp.Error)
		}
	}
	for src, want := range map[string]string{"hook": hooked, "push": pushed} {
		resp := a.serveRequest(context.Background(), &protocol.Request{Op: protocol.OpList, Source: src}, peer{}, nil)
		if resp.Error != "" || len(resp.Jobs) != 1 || resp.Jobs[0].Path != want || resp.Jobs[0].Source != src {
			t.Errorf("list --source %s: %+v", src, resp)
		}
	}
	if resp := a.serveRequest(context.Background(), &protocol.Request{Op: protocol.OpList, Source: "nowhere"}, peer{}, nil); resp.Error == "" {
		t.Error("list --source nowhere: no error")
	}
	st, err := a.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.QueuedBySource["hook"] != 1 || st.QueuedBySource["push"] != 1 || len(st.QueuedBySource) != 2 || st.Capture != nil {
		t.Fatalf("status: by source %v, capture %+v", st.QueuedBySource, st.Capture)
	}
}

// TestCaptureDoesNotTrustPresenceAcrossAReset: a path the uploader last
// knew to be in the cache is not left out once the bucket was emptied:
// the watcher's cursor moves past a row for good, so the presence it
// trusts must be confirmed in the cache's current generation.
func TestCaptureDoesNotTrustPresenceAcrossAReset(t *testing.T) {
	fs := &fakeStore{valid: map[string]bool{}}
	db := newNixDB(t)
	a := captureAgent(t, fs)
	c := startCapturer(t, a, db, CaptureLocal)
	cycle(t, c) // the cursor starts at the top
	ctx := context.Background()
	cacheDir := filepath.Join(filepath.Dir(a.cfg.StateDir), "cache")
	if err := a.uploader.EnsureCacheInfo(ctx); err != nil {
		t.Fatal(err)
	}
	p := db.add(fs, "added", "added")
	narinfo := filepath.Join(cacheDir, storepath.HashPart(p)+".narinfo")
	if err := os.WriteFile(narinfo, []byte("StorePath: "+p+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if missing, err := a.uploader.CheckPresence(ctx, []string{p}); err != nil || len(missing) != 0 {
		t.Fatalf("presence = %v, %v", missing, err)
	}
	// The bucket is emptied; the uploader has not noticed yet.
	entries, _ := os.ReadDir(cacheDir)
	for _, e := range entries {
		os.RemoveAll(filepath.Join(cacheDir, e.Name()))
	}
	if !a.uploader.KnownPresent(p) {
		t.Fatal("setup: the path is not known present")
	}
	if n := cycle(t, c); n != 1 {
		t.Fatalf("cycle queued %d paths after the bucket was emptied, want 1 (%s)", n, p)
	}
}
