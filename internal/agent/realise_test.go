package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/internal/uploader"
)

// TestNotesRebuiltFromQueue: the derivations a queued path was requested
// for are noted again for the realisations after a restart.
func TestNotesRebuiltFromQueue(t *testing.T) {
	a := testAgent(t)
	const p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-out"
	const resolved, known = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x.drv", "/nix/store/cccccccccccccccccccccccccccccccc-x.drv"
	for _, drv := range []string{resolved, known} {
		if _, err := a.queue.Enqueue([]string{p}, drv, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	a.setRealiser(realisation.New(realisation.Options{})) // the notes of the previous run are gone
	if err := a.noteQueued(); err != nil {
		t.Fatal(err)
	}
	if got := a.realiser.Noted(p); !slices.Equal(got, []string{resolved, known}) {
		t.Fatalf("noted for %s: %v, want both derivations", p, got)
	}
}

const (
	floatingDrv = `Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo b > $out"],[("builder","/bin/sh"),("name","ca-b"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
	staticDrv   = `Derive([("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain","","")],[],[],"x86_64-linux","/bin/sh",[],[("name","plain"),("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain")])`
)

// drvReader serves .drv files from a map.
func drvReader(drvs map[string]string) func(string) ([]byte, error) {
	return func(p string) ([]byte, error) {
		if d, ok := drvs[p]; ok {
			return []byte(d), nil
		}
		return nil, os.ErrNotExist
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFilteredPathIsNotQueuedAgain: a path a filter leaves out has no
// realisation to write; its job is done once, and not queued again for the
// derivation it was requested for.
func TestFilteredPathIsNotQueuedAgain(t *testing.T) {
	a := testAgent(t)
	const p, drv = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-excluded", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-excluded.drv"
	fs := &fakeStore{valid: map[string]bool{p: true}}
	a.intake.store = fs
	dir := t.TempDir()
	c, _ := cacheurl.Parse("file://" + filepath.Join(dir, "cache"))
	fb, err := filebucket.New(c.Dir)
	if err != nil {
		t.Fatal(err)
	}
	a.uploader, err = uploader.New(uploader.Options{Bucket: fb, Cache: c, TempDir: filepath.Join(dir, "tmp"), Store: fs,
		Exclude: func(*nixstore.PathInfo) bool { return true }})
	if err != nil {
		t.Fatal(err)
	}
	a.setRealiser(realisation.New(realisation.Options{ReadDrv: drvReader(map[string]string{drv: floatingDrv})}))

	// As a hook request does.
	a.realiser.Note(drv, p)
	if _, err := a.enqueue(context.Background(), []string{p}, drv, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	job, err := a.queue.Lease(time.Now())
	if err != nil || job == nil {
		t.Fatalf("lease: %v, %v", job, err)
	}
	a.process(job)
	waitFor(t, "the filtered job to be done, its notes settled and nothing queued again", func() bool {
		s, err := a.queue.Stats()
		return err == nil && s.Uploaded == 1 && s.Skipped == 1 && s.Pending+s.Leased == 0 && len(a.realiser.Noted(p)) == 0
	})
}

// TestLateDerivationQueuedOnce: a derivation noted for a path while its
// job was being uploaded gets a job of its own if it may have a
// realisation to write, and only once.
func TestLateDerivationQueuedOnce(t *testing.T) {
	a := testAgent(t)
	const p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-out"
	const drvA, drvB, drvStatic = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-a.drv", "/nix/store/cccccccccccccccccccccccccccccccc-b.drv", "/nix/store/dddddddddddddddddddddddddddddddd-s.drv"
	a.intake.store = &fakeStore{valid: map[string]bool{p: true}}
	a.setRealiser(realisation.New(realisation.Options{ReadDrv: drvReader(map[string]string{drvA: floatingDrv, drvB: floatingDrv, drvStatic: staticDrv})}))

	a.realiser.Note(drvA, p)
	if _, err := a.enqueue(context.Background(), []string{p}, drvA, queue.SourceHook); err != nil {
		t.Fatal(err)
	}
	first, _ := a.queue.Lease(time.Now())
	covered := a.realiser.Noted(p) // what realise covered: A
	a.realiser.Note(drvB, p)       // noted during the upload
	a.realiser.Note(drvStatic, p)  // no realisation to write
	if err := a.queue.Ack(first.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	a.realiseLate(first, covered)
	jobs, _ := a.queue.List("", 10)
	if len(jobs) != 1 || jobs[0].Path != p || !slices.Equal(jobs[0].Derivations(), []string{drvB}) {
		t.Fatalf("jobs after the late derivations = %+v, want one for %s", jobs, drvB)
	}

	// The job for B covers nothing (the notes were full, say): B is not
	// queued a third time, nor the static derivation.
	second, _ := a.queue.Lease(time.Now())
	if err := a.queue.Ack(second.ID, queue.Totals{}); err != nil {
		t.Fatal(err)
	}
	a.realiseLate(second, nil)
	if jobs, _ := a.queue.List("", 10); len(jobs) != 0 {
		t.Fatalf("jobs after the second job = %+v, want none", jobs)
	}
}
