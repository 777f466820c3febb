package uploader

import (
	"context"
	"crypto/sha256"
	"fmt"
	"time"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/nixstore"
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

// putRealisations writes the objects Options.Realiser supplies for info,
// whose narinfo (and its references' narinfos) must already be in the
// cache, in the order given. Like narinfos they are written create-only: a
// realisation another machine wrote first (with its signature, and perhaps
// another output of a non-deterministic build, whose narinfo it wrote) is
// kept. An object this uploader already wrote with the same body is not
// written again (dependent realisations recur for every path that relies
// on them). It returns how many objects it wrote.
func (u *Uploader) putRealisations(ctx context.Context, info *nixstore.PathInfo) (int, error) {
	if u.opt.Realiser == nil {
		return 0, nil
	}
	if !u.presence.seen(info.Path) {
		// Never a realisation whose output has no narinfo (a path a filter
		// left out, or one whose upload did not complete).
		asked := time.Now()
		have, err := hasNarinfo(ctx, u.opt.Bucket, info.Path)
		if err != nil || !have {
			return 0, err
		}
		u.presence.mark([]string{info.Path}, asked)
	}
	return u.writeRealisations(ctx, info)
}

// writeRealisations is putRealisations once info's narinfo is known to be
// in the cache (just written, or found there).
func (u *Uploader) writeRealisations(ctx context.Context, info *nixstore.PathInfo) (int, error) {
	if u.opt.Realiser == nil {
		return 0, nil
	}
	extras, err := u.opt.Realiser.For(ctx, info)
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
		if v, ok := u.extrasDone.Load(e.Key); !ok || v.([32]byte) != sum {
			todos = append(todos, todo{e, sum})
		}
	}
	if len(todos) == 0 {
		return 0, nil
	}
	// A realisation relies on its output's narinfo and, through its
	// dependencies, on the outputs it references: like a narinfo, it is
	// not written while a collector may be deleting them.
	within, err := u.checkGuard(ctx, dependencyKeys(info.Path, narinfoKey(info.Path), info.References))
	if err != nil {
		return 0, fmt.Errorf("realisations of %s: %w", info.Path, err)
	}
	n := 0
	err = u.guardedWrite(ctx, within, func(ctx context.Context, b bucket.Bucket) error {
		for _, e := range todos {
			wrote, err := u.putNew(ctx, b, e.Key, e.Body, bucket.PutOptions{ContentType: e.ContentType})
			if err != nil {
				return fmt.Errorf("write %s: %w", e.Key, err)
			}
			if wrote && u.extrasCount.Add(1) > maxExtrasDone {
				u.extrasDone.Clear()
				u.extrasCount.Store(1)
			}
			u.extrasDone.Store(e.Key, e.sum)
			if wrote {
				n++
				u.log.Info("realisation uploaded", "path", info.Path, "key", e.Key)
			}
		}
		return nil
	})
	return n, err
}

// PutRealisations writes the realisations of info.Path, which is already
// in the cache (its narinfo and its closure's): for a job whose path was
// found present, so that derivations that produced it later (or that the
// agent learnt about after the narinfo was written) still get theirs.
func (u *Uploader) PutRealisations(ctx context.Context, info *nixstore.PathInfo) (int, error) {
	return u.putRealisations(ctx, info)
}
