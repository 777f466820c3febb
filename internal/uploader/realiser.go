package uploader

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
)

// Realiser supplies the objects to write right after a path's narinfo:
// the realisations of the derivation outputs the path realises, in an
// order where every realisation comes after those it depends on.
type Realiser interface {
	For(ctx context.Context, info *nixstore.PathInfo) ([]Extra, error)
}

// Extra is one object written after a narinfo.
type Extra = cachefmt.Object

// maxExtrasDone bounds the memory of extras already written.
const maxExtrasDone = 100_000

// writtenExtras remembers the extras this uploader wrote (key → sha256 of
// the body written), so that one that recurs for every path relying on it
// is not written again. Bounded by maxExtrasDone.
type writtenExtras struct {
	done  sync.Map
	count atomic.Int64
}

// has reports whether the object at key was written with the body whose
// sha256 is sum.
func (w *writtenExtras) has(key string, sum [32]byte) bool {
	v, ok := w.done.Load(key)
	return ok && v.([32]byte) == sum
}

// add records the object at key (with the body whose sha256 is sum) as in
// the cache; wrote: this uploader wrote it (else another writer had).
func (w *writtenExtras) add(key string, sum [32]byte, wrote bool) {
	if wrote && w.count.Add(1) > maxExtrasDone {
		w.done.Clear()
		w.count.Store(1)
	}
	w.done.Store(key, sum)
}

// clear forgets every object recorded: write them again when asked.
func (w *writtenExtras) clear() { w.done.Clear() }

// putRealisations writes the objects Options.Realiser supplies for info,
// whose narinfo (and its references' narinfos) must already be in the
// cache, in the order given. Like narinfos they are written create-only: a
// realisation another machine wrote first (with its signature, and perhaps
// another output of a non-deterministic build, whose narinfo it wrote) is
// kept. An object this uploader already wrote with the same body is not
// written again (dependent realisations recur for every path that relies
// on them). It returns how many objects it wrote.
func (pub *publisher) putRealisations(ctx context.Context, info *nixstore.PathInfo) (int, error) {
	if pub.realiser == nil {
		return 0, nil
	}
	if !pub.presence.seen(info.Path) {
		// Never a realisation whose output has no narinfo (a path a filter
		// left out, or one whose upload did not complete).
		asked := time.Now()
		have, err := hasNarinfo(ctx, pub.bucket, info.Path)
		if err != nil || !have {
			return 0, err
		}
		pub.presence.mark([]string{info.Path}, asked)
	}
	return pub.writeRealisations(ctx, info)
}

// writeRealisations is putRealisations once info's narinfo is known to be
// in the cache (just written, or found there).
func (pub *publisher) writeRealisations(ctx context.Context, info *nixstore.PathInfo) (int, error) {
	if pub.realiser == nil {
		return 0, nil
	}
	extras, err := pub.realiser.For(ctx, info)
	if err != nil {
		return 0, fmt.Errorf("realisations of %s: %w", info.Path, err)
	}
	// Only what is not known to be written: a path found present asks
	// here on every job, and needs no guard check for nothing.
	type todo struct {
		Extra
		sum [32]byte
	}
	var todos []todo
	for _, e := range extras {
		sum := sha256.Sum256(e.Body)
		if !pub.extras.has(e.Key, sum) {
			todos = append(todos, todo{e, sum})
		}
	}
	if len(todos) == 0 {
		return 0, nil
	}
	// A realisation relies on its output's narinfo and, through its
	// dependencies, on the outputs it references: like a narinfo, it is
	// not written while a collector may be deleting them.
	within, err := pub.checkGuard(ctx, dependencyKeys(info.Path, narinfoKey(info.Path), info.References))
	if err != nil {
		return 0, fmt.Errorf("realisations of %s: %w", info.Path, err)
	}
	n := 0
	err = pub.guardedWrite(ctx, within, func(ctx context.Context, b bucket.Bucket) error {
		for _, e := range todos {
			wrote, err := pub.putNew(ctx, b, e.Key, e.Body, bucket.PutOptions{ContentType: e.ContentType})
			if err != nil {
				return fmt.Errorf("write %s: %w", e.Key, err)
			}
			pub.extras.add(e.Key, e.sum, wrote)
			if wrote {
				n++
				pub.log.Info("realisation uploaded", "path", info.Path, "key", e.Key)
			}
		}
		return nil
	})
	return n, err
}
