package uploader

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"

	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
)

// fakeRealiser gives every path one realisation of its own and one shared
// by all (like a dependency every output relies on).
type fakeRealiser struct {
	mu    sync.Mutex
	calls []string
	fail  error
}

func (f *fakeRealiser) For(_ context.Context, info *nixstore.PathInfo) ([]Extra, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, info.Path)
	if f.fail != nil {
		return nil, f.fail
	}
	base := filepath.Base(info.Path)
	return []Extra{
		{Key: "realisations/shared.doi", ContentType: "application/json", Body: []byte(`{"shared":1}`)},
		{Key: "realisations/" + base + ".doi", ContentType: "application/json", Body: []byte(`{"outPath":"` + base + `"}`)},
	}, nil
}

// TestRealisationsAfterNarinfo: each path's realisations are written
// right after its narinfo (never before), in the order given, counted;
// one already written with the same body is not written again.
func TestRealisationsAfterNarinfo(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}, 2: {0, 1}})
	r := &fakeRealiser{}
	u := f.uploader(t, Options{Realiser: r})
	res, err := u.Upload(context.Background(), f.path(2))
	if err != nil {
		t.Fatal(err)
	}
	if res.Paths != 3 || res.Realisations != 4 || len(r.calls) != 3 {
		t.Fatalf("result %+v after %d calls; want 3 paths and 4 realisations (the shared one once)", res, len(r.calls))
	}
	shared := f.rec.index("realisations/shared.doi")
	for i := 0; i <= 2; i++ {
		ni := f.rec.index(hashes[i] + ".narinfo")
		own := f.rec.index("realisations/" + filepath.Base(f.path(i)) + ".doi")
		if own < 0 || own < ni {
			t.Errorf("p%d: realisation at %d, narinfo at %d", i, own, ni)
		}
		if shared < ni && i == 0 {
			t.Errorf("shared realisation (%d) before the first narinfo (%d)", shared, ni)
		}
	}
	if got := f.rec.count("realisations/shared.doi"); got != 1 {
		t.Errorf("shared realisation written %d times", got)
	}
	// A path already in the cache: PutRealisations writes only what is new.
	n, err := u.PutRealisations(context.Background(), f.store.infos[f.path(2)])
	if err != nil || n != 0 {
		t.Fatalf("PutRealisations = %d, %v; want nothing new", n, err)
	}
	// After Forget (the bucket was emptied) everything is written again.
	var keys []string
	f.rec.Bucket.List(context.Background(), bucket.ListOptions{Prefix: "realisations/", Recursive: true}, func(o bucket.Object) error {
		keys = append(keys, o.Key)
		return nil
	})
	bucket.DeleteAll(context.Background(), f.rec.Bucket, keys)
	u.Forget()
	if n, err := u.PutRealisations(context.Background(), f.store.infos[f.path(2)]); err != nil || n != 2 {
		t.Fatalf("PutRealisations after Forget = %d, %v", n, err)
	}
}

// TestRealiserErrorFailsThePath: the path is not marked present, so a
// retry writes its narinfo and realisations again.
func TestRealiserErrorFailsThePath(t *testing.T) {
	f := newFixture(t, nil)
	r := &fakeRealiser{fail: errors.New("daemon went away")}
	u := f.uploader(t, Options{Realiser: r})
	if _, err := u.Upload(context.Background(), f.path(0)); err == nil || IsPermanent(err) {
		t.Fatalf("Upload = %v, want a transient error", err)
	}
	r.fail = nil
	res, err := u.Upload(context.Background(), f.path(0))
	if err != nil || res.Realisations != 2 {
		t.Fatalf("retry: %+v, %v", res, err)
	}
}

// TestNoRealisationWithoutItsNarinfo: a path a filter leaves out gets no
// realisation either (it would name an output the cache lacks).
func TestNoRealisationWithoutItsNarinfo(t *testing.T) {
	f := newFixture(t, nil)
	r := &fakeRealiser{}
	u := f.uploader(t, Options{Realiser: r, Exclude: func(i *nixstore.PathInfo) bool { return i.Path == f.path(0) }})
	res, err := u.Upload(context.Background(), f.path(0))
	if err != nil || !res.SelfSkipped || res.Realisations != 0 {
		t.Fatalf("Upload of an excluded path = %+v, %v", res, err)
	}
	if n, err := u.PutRealisations(context.Background(), f.store.infos[f.path(0)]); err != nil || n != 0 {
		t.Fatalf("PutRealisations for a path without a narinfo = %d, %v", n, err)
	}
	if got := f.rec.count("realisations/"); got != 0 {
		t.Fatalf("%d realisations written without their output's narinfo", got)
	}
}

// TestRealisationsAfterReset: a bucket emptied behind the agent's back,
// noticed by the generation check, gets the realisations back with the
// paths; so do paths a collector announced (their realisations go too).
func TestRealisationsAfterReset(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	u := f.uploader(t, Options{Realiser: &fakeRealiser{}})
	ctx := context.Background()
	if _, err := u.Upload(ctx, f.path(1)); err != nil {
		t.Fatal(err)
	}
	var keys []string
	f.rec.Bucket.List(ctx, bucket.ListOptions{Recursive: true}, func(o bucket.Object) error {
		keys = append(keys, o.Key)
		return nil
	})
	bucket.DeleteAll(ctx, f.rec.Bucket, keys)
	if err := u.CheckGeneration(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := u.Upload(ctx, f.path(1))
	if err != nil || res.Paths != 2 || res.Realisations != 3 {
		t.Fatalf("after the reset: %+v, %v; want 2 paths and 3 realisations again", res, err)
	}

	// A collector announces p1: its realisations may go with it.
	if err := f.rec.Bucket.Delete(ctx, "realisations/"+filepath.Base(f.path(1))+".doi"); err != nil {
		t.Fatal(err)
	}
	u.ForgetPaths([]string{f.path(1)})
	if n, err := u.PutRealisations(ctx, f.store.infos[f.path(1)]); err != nil || n != 1 {
		t.Fatalf("PutRealisations after ForgetPaths = %d, %v; want the deleted one again", n, err)
	}
}
