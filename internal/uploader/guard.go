package uploader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// Guard tells the uploader which existing objects a garbage collector is
// about to delete (cachegc's Watcher implements it).
type Guard interface {
	// Check returns nil if a narinfo depending on the existing objects at
	// keys (its NAR, the narinfos of its references) may be written now, or a
	// transient error if one of them is about to be deleted. With nil it
	// returns how long the write may take: it is given up after that.
	Check(ctx context.Context, keys []string) (within time.Duration, err error)
	// Doomed reports whether the object at key is announced for deletion.
	Doomed(key string) bool
}

// narinfoKey is the key of p's narinfo.
func narinfoKey(p string) string { return cachefmt.Keys.NarinfoOf(p) }

// dependencyKeys lists the keys a narinfo for storePath depends on,
// whether or not they existed before this upload: its NAR (also
// when this upload has just written it: a NAR key is content-addressed, so
// a doomed NAR rewritten now may still be deleted by the sweep), and the
// narinfos of its references (also those written by this upload: with a
// short retention they can be doomed by a cycle that began meanwhile).
func dependencyKeys(storePath, url string, refs []string) []string {
	keys := []string{url}
	self := storepath.HashPart(storePath)
	for _, r := range refs {
		if h := cachefmt.RefHash(r); h != "" && h != self {
			keys = append(keys, cachefmt.Keys.Narinfo(h))
		}
	}
	return keys
}

// guardNarinfo asks the guard whether the narinfo of storePath may be
// written now, and returns how long the write may take (0: no limit).
// Without a guard it always may. A narinfo whose own key is announced for
// deletion is checked like the objects it relies on: written once the
// sweep may have begun, the sweep could delete it again.
func (pub *publisher) guardNarinfo(ctx context.Context, storePath, url string, refs []string) (time.Duration, error) {
	keys := dependencyKeys(storePath, url, refs)
	if pub.doomed(storePath) {
		keys = append(keys, narinfoKey(storePath))
	}
	within, err := pub.checkGuard(ctx, keys)
	if err != nil {
		return 0, fmt.Errorf("narinfo of %s: %w", storePath, err)
	}
	return within, nil
}

// checkGuard asks the guard (if any) about a write relying on keys, and
// returns how long the write may take (0: no limit).
func (pub *publisher) checkGuard(ctx context.Context, keys []string) (time.Duration, error) {
	if pub.guard == nil {
		return 0, nil
	}
	// Learnt before the check, not in the time it allows; a probe that
	// cannot tell is made again at the write.
	_, _ = pub.conditionalWrites(ctx)
	return pub.guard.Check(ctx, keys)
}

// errLate: a write the guard allowed did not complete in the time it
// allowed, and was given up. Transient: the next attempt checks again.
var errLate = errors.New("not written within the time the garbage-collection check allows; retrying")

// guardedWrite runs write, which the guard allowed to take at most within
// (0: no guard, no limit). It writes to the bucket directly, not through
// the request window (whose wait has no bound), and gives up when the time
// is over: a write landing later could rely on an object a sweep deleted.
func (pub *publisher) guardedWrite(ctx context.Context, within time.Duration, write func(context.Context, bucket.Bucket) error) error {
	if within <= 0 {
		return write(ctx, pub.bucket)
	}
	wctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	err := write(wctx, pub.direct)
	if err != nil && ctx.Err() == nil && errors.Is(wctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w (%s): %v", errLate, within.Round(time.Millisecond), err)
	}
	return err
}

// doomed reports whether p's narinfo is announced for deletion.
func (pub *publisher) doomed(p string) bool {
	return pub.guard != nil && pub.guard.Doomed(narinfoKey(p))
}

// presentTop reports whether the top path p of an upload has a narinfo in
// the cache. If it has one that a collector announced for deletion, the
// narinfo is rewritten first (revived): a narinfo written after the
// collector's mark is a root of its sweep, so p and its closure stay.
func (pub *publisher) presentTop(ctx context.Context, p string) (bool, error) {
	have, err := hasNarinfo(ctx, pub.bucket, p)
	if err != nil || !have || !pub.doomed(p) {
		return have, err
	}
	return pub.revive(ctx, p)
}

// revive rewrites p's narinfo with the bytes it has, if the guard allows
// it, and only if nobody changed it meanwhile (If-Match). It reports false
// if the narinfo is gone (the caller uploads p again).
func (pub *publisher) revive(ctx context.Context, p string) (bool, error) {
	key := narinfoKey(p)
	data, info, err := pub.bucket.Get(ctx, key, cachefmt.MaxNarinfoSize)
	if bucket.IsNotExist(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read narinfo of %s to revive it: %w", p, err)
	}
	plain, err := cachefmt.DecodeContentEncoding(info.ContentEncoding, data)
	if err != nil {
		return false, fmt.Errorf("narinfo of %s: %w", p, err)
	}
	ni, err := cachefmt.ParseNarInfo(plain)
	if err != nil {
		// Not a narinfo stock Nix can use. It is not replaced (narinfos
		// never are); the collector deletes it, and the audit names it.
		pub.log.Warn("narinfo in the cache is not valid and is not revived", "path", p, "err", err)
		return false, nil
	}
	opts := bucket.PutOptions{ContentType: "text/x-nix-narinfo", ContentEncoding: info.ContentEncoding}
	cond, err := pub.conditionalWrites(ctx)
	if err != nil {
		return false, err
	}
	if cond {
		opts.IfMatch = info.ETag // nobody changed it meanwhile
	}
	within, err := pub.guardNarinfo(ctx, p, ni.URL, ni.References)
	if err != nil {
		return false, err
	}
	err = pub.guardedWrite(ctx, within, func(ctx context.Context, b bucket.Bucket) error {
		_, err := b.Put(ctx, key, bytes.NewReader(data), int64(len(data)), opts)
		return err
	})
	if bucket.IsPrecondition(err) {
		return false, fmt.Errorf("narinfo of %s changed while it was being revived; retrying", p)
	}
	if err != nil {
		return false, fmt.Errorf("revive narinfo of %s: %w", p, err)
	}
	pub.log.Info("narinfo revived: it was announced for garbage collection", "path", p)
	return true, nil
}
