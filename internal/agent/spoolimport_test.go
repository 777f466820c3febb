package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/spool"
)

// TestSpoolFileTheDaemonRejectsDoesNotStallTheSpool: a floating request
// whose derivation the Nix daemon no longer knows (collected while agentd
// was away) does not hold up the files behind it; it is tried again at the
// next imports, then renamed *.bad. A daemon that cannot be reached charges
// no file an attempt.
func TestSpoolFileTheDaemonRejectsDoesNotStallTheSpool(t *testing.T) {
	a := testAgent(t)
	a.setRealiser(realisation.New(realisation.Options{}))
	const gone = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-gone.drv"
	const next, later = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-next", "/nix/store/cccccccccccccccccccccccccccccccc-later"
	fs := &fakeStore{
		valid:  map[string]bool{next: true, later: true},
		drvErr: map[string]error{gone: &nixstore.DaemonError{Msg: "path '" + gone + "' is not valid"}},
	}
	a.intake.store = fs
	stuck, err := spool.Write(a.spoolDir(), spool.Entry{Drv: gone, Floating: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{next}}); err != nil {
		t.Fatal(err)
	}
	queued := func(p string) bool {
		jobs, _ := a.queue.List("", 10)
		for _, j := range jobs {
			if j.Path == p {
				return true
			}
		}
		return false
	}

	a.spoolImport.run(context.Background())
	if !queued(next) {
		t.Fatal("the file behind the one the daemon rejects was not imported")
	}
	if _, err := os.Stat(stuck); err != nil {
		t.Fatalf("the rejected file was not kept for another attempt: %v", err)
	}

	// The daemon out of reach: nothing is charged.
	fs.mu.Lock()
	fs.drvErr[gone] = errors.New("connect to nix store: connection refused")
	fs.mu.Unlock()
	for range 2 * maxSpoolAttempts {
		a.spoolImport.run(context.Background())
	}
	if _, err := os.Stat(stuck); err != nil {
		t.Fatalf("a file was renamed while the daemon was out of reach: %v", err)
	}

	fs.mu.Lock()
	fs.drvErr[gone] = &nixstore.DaemonError{Msg: "path '" + gone + "' is not valid"}
	fs.mu.Unlock()
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{later}}); err != nil {
		t.Fatal(err)
	}
	for i := 1; ; i++ {
		a.spoolImport.run(context.Background())
		if _, err := os.Stat(stuck + ".bad"); err == nil {
			break
		}
		if i > maxSpoolAttempts {
			t.Fatalf("the rejected file was not renamed to .bad after %d more imports", i)
		}
	}
	if !queued(later) {
		t.Fatal("a file written later was not imported")
	}
	if files, _ := spool.Files(a.spoolDir()); len(files) != 0 {
		t.Fatalf("spool files left: %v", files)
	}
}

// TestSpoolOddEntriesAndFailedRenames: entries of the spool directory no
// writer makes (a symlink, a directory, another name) are never read and
// are reported once each; an unreadable file that cannot be renamed *.bad
// is reported as such, kept, and not counted as set aside.
func TestSpoolOddEntriesAndFailedRenames(t *testing.T) {
	a := testAgent(t)
	var logs lockedLog
	a.setLog(slog.New(slog.NewTextHandler(&logs, nil)))
	a.setRealiser(realisation.New(realisation.Options{}))
	a.intake.store = &fakeStore{}
	dir := a.spoolDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "elsewhere.json")
	os.WriteFile(target, []byte(`{"paths":[]}`), 0o600)
	if err := os.Symlink(target, filepath.Join(dir, "1-link.json")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "notes.txt"), nil, 0o600)
	garbage := filepath.Join(dir, "2-garbage.json")
	os.WriteFile(garbage, []byte("not json"), 0o600)
	// A directory in the way of the rename.
	if err := os.MkdirAll(filepath.Join(garbage+".bad", "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		a.spoolImport.run(context.Background())
	}
	out := logs.String()
	for _, want := range []string{"1-link.json", "notes.txt", "2-garbage.json.bad"} {
		if n := strings.Count(out, "spool directory entry ignored"); n != 3 || !strings.Contains(out, want) {
			t.Errorf("odd entry %s: %d reports, want each once:\n%s", want, n, out)
		}
	}
	if strings.Contains(out, "unreadable spool file; renamed to .bad") || !strings.Contains(out, "could not be renamed to .bad") {
		t.Errorf("a failed rename is not reported as such:\n%s", out)
	}
	if _, err := os.Stat(garbage); err != nil {
		t.Errorf("the file that could not be renamed is gone: %v", err)
	}
	if _, err := os.Stat(target); err != nil {
		t.Errorf("the symlink's target was touched: %v", err)
	}
}

type lockedLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestSpoolImportAsksOncePerFile: the paths of one spool file are checked
// with one query to the Nix daemon, not one round trip each; paths that
// are not store paths, or not valid, are dropped and the others queued.
func TestSpoolImportAsksOncePerFile(t *testing.T) {
	a := testAgent(t)
	a.setRealiser(realisation.New(realisation.Options{}))
	fs := &fakeStore{valid: map[string]bool{}}
	a.intake.store = fs
	var paths []string
	for i := range 500 {
		p := fmt.Sprintf("/nix/store/%032d-p%d", i, i)
		p = strings.ReplaceAll(p, "0", "a") // base32 has no 'e', 'o', 'u', 't'
		paths = append(paths, p)
		if i != 7 {
			fs.valid[p] = true
		}
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: append(paths, "/tmp/not-a-store-path")}); err != nil {
		t.Fatal(err)
	}
	a.spoolImport.run(context.Background())
	if fs.validCalls != 1 {
		t.Errorf("%d validity queries for one spool file, want 1", fs.validCalls)
	}
	jobs, err := a.queue.List("", 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != len(paths)-1 {
		t.Errorf("%d jobs queued, want %d", len(jobs), len(paths)-1)
	}
	for _, j := range jobs {
		if j.Path == paths[7] {
			t.Errorf("the invalid path %s was queued", j.Path)
		}
	}
	if files, _ := spool.Files(a.spoolDir()); len(files) != 0 {
		t.Fatalf("spool files left: %v", files)
	}
}

// hangingStore is a Nix daemon that stops answering validity queries
// until the request's context ends (or the test releases it).
type hangingStore struct {
	*fakeStore
	release chan struct{}
}

func (s *hangingStore) QueryValidPaths(ctx context.Context, paths []string) ([]string, error) {
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-s.release:
		return s.fakeStore.QueryValidPaths(ctx, paths)
	}
}

// TestSpoolImportBoundedPerFile: a Nix daemon that stops answering
// postpones a spool import after the bound of one file; the file is kept
// and charged no attempt, and is imported once the daemon answers.
func TestSpoolImportBoundedPerFile(t *testing.T) {
	a := testAgent(t)
	a.setRealiser(realisation.New(realisation.Options{}))
	a.spoolImport.fileBound = 200 * time.Millisecond
	const p = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-p"
	hs := &hangingStore{fakeStore: &fakeStore{valid: map[string]bool{p: true}}, release: make(chan struct{})}
	released := false
	release := func() {
		if !released {
			released = true
			close(hs.release)
		}
	}
	t.Cleanup(release)
	a.intake.store = hs
	f, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{p}})
	if err != nil {
		t.Fatal(err)
	}
	for range maxSpoolAttempts + 1 {
		done := make(chan struct{})
		go func() { defer close(done); a.spoolImport.run(context.Background()) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			release()
			<-done
			t.Fatal("a spool import waited on a Nix daemon that does not answer past the bound of one file")
		}
	}
	if _, err := os.Stat(f); err != nil {
		t.Fatalf("the spool file was not kept: %v", err)
	}
	release()
	a.spoolImport.run(context.Background())
	if jobs, _ := a.queue.List("", 10); len(jobs) != 1 || jobs[0].Path != p {
		t.Fatalf("jobs after the daemon answered: %+v", jobs)
	}
}
