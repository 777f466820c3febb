package uploader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// PresenceStore remembers, per cache identity and generation, which
// narinfos (by hash part) the cache holds, so that a restart does not have
// to ask again.
type PresenceStore interface {
	AddPresent(identity string, hashes []string, now time.Time)
	// Present returns the hashes recorded since notBefore, with the time
	// each was recorded.
	Present(identity string, notBefore time.Time) (map[string]time.Time, error)
	// PrunePresent deletes records older than notBefore, and all records
	// of identities that start with prefix other than keep.
	PrunePresent(prefix, keep string, notBefore time.Time) (int, error)
	ForgetPresent(identity string) error
}

// DefaultPresenceTTL is how long a remembered "the cache has it" is
// trusted when nothing says otherwise. A reset of the bucket is noticed
// much sooner, through the cache's generation (see presence).
const DefaultPresenceTTL = 24 * time.Hour

// maxPresent bounds the in-memory presence cache; beyond it the oldest
// entries are dropped (they are asked about again if needed).
const maxPresent = 500_000

// maxUnsure bounds presence.unsure. Past it the entries are dropped and
// every present narinfo is checked as in a young cache (its closure and
// NAR), until the process ends: slower, never less safe.
const maxUnsure = 100_000

// presence is what the uploader knows about which narinfos the cache
// holds, keyed by hash part.
//
// Every answer belongs to a generation of the cache: the identity of its
// nix-cache-info object (ETag and modification time). A bucket that is
// emptied and recreated, or reset by an operator, gets a new
// nix-cache-info, and with it a new generation; everything known about the
// old one is forgotten at once. The generation is checked when agentd
// starts, by every probe, and at least every generationCheckEvery while
// uploads run; a narinfo is only written if the generation its
// references were found present in is still the current one.
type presence struct {
	bucket bucket.Bucket
	guard  Guard         // nil without a collector
	store  PresenceStore // nil: nothing kept across restarts
	ttl    time.Duration // how long a "the cache has it" is trusted
	// cacheID is the cache's identity (persistence keys start with it),
	// cacheName its URL for logs.
	cacheID, cacheName string
	// onReset runs when everything known is forgotten (what else went
	// with the cache: the realisations written).
	onReset func()
	log     *slog.Logger

	mu      sync.Mutex
	known   map[string]int64 // hash → unix time it was seen present
	pending map[string]*pendingCheck
	// absent remembers, briefly, hashes the cache was just found to lack
	// (a bulk check ahead of the jobs): the job need not ask again. Being
	// wrong costs nothing worse than an upload the cache then keeps as it
	// is (narinfo writes are create-only).
	absent map[string]time.Time
	// forgotten remembers when hashes were forgotten (a collector
	// announced them): an answer asked before that, or a record loaded
	// from disk later, must not bring them back. Pruned after the TTL.
	forgotten map[string]time.Time
	// unsure holds hashes whose narinfo this uploader wrote in a cache
	// that turned out to be reset while it wrote: the narinfo may be
	// there without its NAR or references. They count as missing, so
	// that the next upload puts back what they need, until a narinfo
	// write of theirs (or the finding that another writer's is there) is
	// confirmed in the current generation.
	unsure map[string]bool
	// unsureOverflowed: unsure outgrew maxUnsure and was dropped; present
	// narinfos are checked as in a young cache from then on.
	unsureOverflowed bool
	// verifiedNAR holds hashes whose narinfo was checked to name a NAR
	// that is there, in this generation (see Uploader.verifyPresent).
	verifiedNAR map[string]bool
	// gen is the cache's generation: entries of known belong to its
	// current counter.
	gen      *generation
	identity string // persistence key: cache identity + generation

	// bucketKeys estimates the keys at the cache's root (narinfos and
	// listings), learned from listings: it decides HEADs versus listing.
	bucketKeys atomic.Int64
	// unlistable: listing the bucket failed for good (a cache URL that
	// names the bucket inside endpoint=); presence is asked by HEAD only.
	unlistable atomic.Bool
	// joined, if set (tests), is called when a check joins questions
	// another caller asked.
	joined func()
}

type pendingCheck struct {
	done    chan struct{}
	present bool
	gen     uint64 // the generation the question was asked in
	err     error
}

// presenceConfig is what presence needs from the uploader's options.
type presenceConfig struct {
	bucket             bucket.Bucket
	guard              Guard
	store              PresenceStore
	ttl                time.Duration
	cacheID, cacheName string
	onReset            func()
	log                *slog.Logger
}

func newPresence(c presenceConfig, gen *generation) *presence {
	return &presence{bucket: c.bucket, guard: c.guard, store: c.store, ttl: c.ttl, cacheID: c.cacheID, cacheName: c.cacheName,
		onReset: c.onReset, log: c.log, gen: gen, known: map[string]int64{}, pending: map[string]*pendingCheck{}, absent: map[string]time.Time{},
		forgotten: map[string]time.Time{}, unsure: map[string]bool{}, verifiedNAR: map[string]bool{}}
}

// seen reports whether the cache is known to hold p's narinfo, whether or
// not a collector announced it: a narinfo written now may still rely on it
// (Guard.Check decides when it is written).
func (pr *presence) seen(p string) bool {
	h := storepath.HashPart(p)
	pr.mu.Lock()
	at, ok := pr.known[h]
	pr.mu.Unlock()
	return ok && time.Since(time.Unix(at, 0)) <= pr.ttl
}

// has reports whether the cache holds p's narinfo and it can be trusted to
// stay: known present and not announced for deletion.
func (pr *presence) has(p string) bool {
	if !pr.seen(p) {
		return false
	}
	g := pr.guard
	return g == nil || !g.Doomed(cachefmt.Keys.NarinfoOf(p))
}

// mark records that the narinfos of paths are in the cache, in memory and
// (lazily) in the presence store.
func (pr *presence) mark(paths []string, asked time.Time) {
	pr.markIn(paths, pr.gen.current(), asked)
}

// markIn is mark for an answer to a question sent at asked, in generation
// gen: if the cache was reset since (the answer may describe the old
// bucket), it is dropped, and so is the answer for a path forgotten after
// the question was sent (a HEAD answered just before a sweep deleted the
// narinfo, delivered after the collector's announcement was read).
func (pr *presence) markIn(paths []string, gen uint64, asked time.Time) {
	if len(paths) == 0 {
		return
	}
	now := time.Now()
	hashes := make([]string, 0, len(paths))
	pr.mu.Lock()
	if pr.gen.current() != gen {
		pr.mu.Unlock()
		return
	}
	for _, p := range paths {
		h := storepath.HashPart(p)
		if f, ok := pr.forgotten[h]; (ok && !f.Before(asked)) || pr.unsure[h] {
			continue
		}
		hashes = append(hashes, h)
		pr.known[h] = now.Unix()
	}
	if len(pr.known) > maxPresent {
		pr.evictLocked()
	}
	identity := pr.identity
	pr.mu.Unlock()
	if ps := pr.store; ps != nil && identity != "" {
		ps.AddPresent(identity, hashes, now)
	}
}

// evictLocked drops the older half of the in-memory cache.
func (pr *presence) evictLocked() {
	var sum int64
	for _, at := range pr.known {
		sum += at
	}
	mean := sum / int64(len(pr.known))
	for h, at := range pr.known {
		if at <= mean {
			delete(pr.known, h)
		}
	}
}

// forget drops what is known about paths (a collector announced them),
// also what answers in flight and records not loaded yet would say, and
// returns their hashes.
func (pr *presence) forget(paths []string) []string {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	now := time.Now()
	hashes := make([]string, 0, len(paths))
	for _, p := range paths {
		h := storepath.HashPart(p)
		hashes = append(hashes, h)
		delete(pr.known, h)
		pr.forgotten[h] = now
	}
	return hashes
}

// doubt marks paths unsure (see presence.unsure) and forgets them.
func (pr *presence) doubt(paths []string) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if len(pr.unsure)+len(paths) > maxUnsure {
		// The paths doubted now stay doubted (see node.repair too).
		pr.unsure = map[string]bool{}
		pr.unsureOverflowed = true
	}
	for _, p := range paths {
		h := storepath.HashPart(p)
		pr.unsure[h] = true
		delete(pr.known, h)
	}
}

// doubted reports whether p is unsure (see presence.unsure).
func (pr *presence) doubted(p string) bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.unsure[storepath.HashPart(p)]
}

// verified reports whether p's narinfo was checked to name a NAR that is
// there, in this generation.
func (pr *presence) verified(p string) bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.verifiedNAR[storepath.HashPart(p)]
}

// markVerified records that p's narinfo names a NAR that is there, found
// by a check begun in generation gen.
func (pr *presence) markVerified(p string, gen uint64) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.gen.current() == gen && len(pr.verifiedNAR) < maxPresent {
		pr.verifiedNAR[storepath.HashPart(p)] = true
	}
}

// settled clears p's doubt: its narinfo write was just confirmed.
func (pr *presence) settled(p string) {
	pr.mu.Lock()
	delete(pr.unsure, storepath.HashPart(p))
	pr.mu.Unlock()
}

// reset forgets everything: the cache's generation changed (or an operator
// asked). Uploads planned before fail their narinfo write and start over.
func (pr *presence) reset() error {
	pr.mu.Lock()
	identity := pr.identity
	pr.gen.advance()
	pr.resetLocked()
	pr.mu.Unlock()
	return pr.forgetRecords(identity)
}

// resetLocked forgets what was known, once the generation counter moved
// on; callers hold mu, so that no answer of the old counter is recorded
// after it (markIn checks the counter under mu).
func (pr *presence) resetLocked() {
	pr.onReset()                // the realisations written went with the cache
	pr.unsureOverflowed = false // what was dropped went with the cache
	pr.known = map[string]int64{}
	pr.absent = map[string]time.Time{}
	pr.verifiedNAR = map[string]bool{}
}

// forgetRecords drops the persisted presence records of identity.
func (pr *presence) forgetRecords(identity string) error {
	if ps := pr.store; ps != nil && identity != "" {
		return ps.ForgetPresent(identity)
	}
	return nil
}

// pruneRecords prunes the persisted records older than the TTL, and
// those of other generations, and returns how many it dropped.
func (pr *presence) pruneRecords() (int, error) {
	pr.mu.Lock()
	identity := pr.identity
	pr.mu.Unlock()
	if pr.store == nil || identity == "" {
		return 0, nil
	}
	return pr.store.PrunePresent(pr.cacheID+"#", identity, time.Now().Add(-pr.ttl))
}

// forgetPersisted forgets paths (see forget) and dates their persisted
// records at the Unix epoch, older than any TTL, so that they are never
// loaded again.
func (pr *presence) forgetPersisted(paths []string) {
	hashes := pr.forget(paths)
	pr.mu.Lock()
	identity := pr.identity
	pr.mu.Unlock()
	if pr.store != nil && identity != "" && len(hashes) > 0 {
		pr.store.AddPresent(identity, hashes, time.Unix(0, 0))
	}
}

// count is how many narinfos the cache is known to hold.
func (pr *presence) count() int {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return len(pr.known)
}

// setGeneration records the cache's current generation name. A change from
// a known one resets the presence cache. The first generation seen in
// this process loads what an earlier run remembered of it.
//
// asked is when the question that got name was sent: a confirmation counts
// for plans made before it.
func (pr *presence) setGeneration(name string, asked time.Time) (changed bool, err error) {
	pr.mu.Lock()
	// A new generation: the counter moves on and what was known is
	// dropped before its name and confirmation are published, in one
	// critical section (an answer of the old generation then fails
	// markIn's check, and settle sees the new counter).
	old := pr.gen.observe(name, asked, pr.resetLocked)
	if old == name {
		pr.mu.Unlock()
		return false, nil
	}
	oldIdentity := pr.identity
	base := pr.cacheID + "#"
	pr.identity = base + name
	identity := pr.identity
	pr.mu.Unlock()
	if old != "" {
		pr.log.Warn("the cache was reset (its nix-cache-info changed); forgetting what it held", "cache", pr.cacheName)
		if err := pr.forgetRecords(oldIdentity); err != nil {
			return true, err
		}
	}
	ps := pr.store
	if ps == nil {
		return old != "", nil
	}
	notBefore := time.Now().Add(-pr.ttl)
	if n, err := ps.PrunePresent(base, identity, notBefore); err != nil {
		return old != "", err
	} else if n > 0 {
		pr.log.Info("pruned presence records", "records", n)
	}
	if old != "" {
		return true, nil
	}
	hashes, err := ps.Present(identity, notBefore)
	if err != nil {
		return false, fmt.Errorf("load presence cache: %w", err)
	}
	pr.mu.Lock()
	for h, at := range hashes {
		// As old as the record: trusted for what is left of the TTL;
		// never what was forgotten since it was recorded.
		if f, ok := pr.forgotten[h]; ok && !f.Before(at) {
			continue
		}
		if _, ok := pr.known[h]; !ok && !pr.unsure[h] {
			pr.known[h] = at.Unix()
		}
	}
	pr.mu.Unlock()
	if len(hashes) > 0 {
		pr.log.Info("presence cache loaded", "cache", pr.cacheName, "paths", len(hashes))
	}
	return false, nil
}

// young reports whether the cache was created or reset less than d ago
// (storeNow: the store's clock), or present narinfos must be checked as
// if it were (too many were doubted to remember them one by one).
func (pr *presence) young(storeNow time.Time, d time.Duration) bool {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.unsureOverflowed || pr.gen.bornWithin(storeNow, d)
}

// prune drops in-memory entries older than the TTL.
func (pr *presence) prune() int {
	cutoff := time.Now().Add(-pr.ttl).Unix()
	pr.mu.Lock()
	defer pr.mu.Unlock()
	n := 0
	for h, at := range pr.absent {
		if time.Since(at) > absentTTL {
			delete(pr.absent, h)
		}
	}
	for h, at := range pr.known {
		if at < cutoff {
			delete(pr.known, h)
			n++
		}
	}
	for h, at := range pr.forgotten {
		if at.Unix() < cutoff {
			delete(pr.forgotten, h)
		}
	}
	return n
}

// absentTTL is how long a "the cache lacks it" is used for; maxAbsent
// bounds how many are kept.
const (
	absentTTL = time.Minute
	maxAbsent = 100_000
)

// check finds out which of paths have a narinfo in the cache and returns
// the ones that do not. Paths known present cost nothing; paths another
// caller is asking about right now are waited for, not asked twice. For
// many paths one listing per hash prefix replaces a HEAD per path (1,000
// keys per request); the first error stops the rest.
func (pr *presence) check(ctx context.Context, paths []string) (missing []string, err error) {
	var mine []string
	var wait []*pendingCheck
	var waitPaths []string
	pr.mu.Lock()
	now := time.Now()
	for _, p := range paths {
		h := storepath.HashPart(p)
		if pr.trustedLocked(h, now) {
			continue
		}
		if pr.unsure[h] {
			missing = append(missing, p)
			continue
		}
		if pc, ok := pr.pending[h]; ok {
			wait = append(wait, pc)
			waitPaths = append(waitPaths, p)
			continue
		}
		if at, ok := pr.absent[h]; ok {
			delete(pr.absent, h) // an answer is used once
			if now.Sub(at) <= absentTTL {
				missing = append(missing, p)
				continue
			}
		}
		pr.pending[h] = &pendingCheck{done: make(chan struct{})}
		mine = append(mine, p)
	}
	pr.mu.Unlock()
	if len(wait) > 0 && pr.joined != nil {
		pr.joined()
	}

	gen, asked := pr.gen.current(), time.Now()
	found, err := pr.ask(ctx, mine)
	pr.markIn(found, gen, asked)
	foundSet := make(map[string]bool, len(found))
	for _, p := range found {
		foundSet[p] = true
	}
	pr.mu.Lock()
	// An answer that describes the cache before a reset noticed meanwhile
	// says nothing about the cache now: such paths count as missing (an
	// upload of a path that is there after all costs a create-only write).
	stale := pr.gen.current() != gen
	for _, p := range mine {
		h := storepath.HashPart(p)
		pc := pr.pending[h]
		delete(pr.pending, h)
		pc.present, pc.gen, pc.err = foundSet[p], gen, err
		close(pc.done)
		if err == nil && (!foundSet[p] || stale) {
			missing = append(missing, p)
		}
	}
	pr.mu.Unlock()
	if err != nil {
		return nil, err
	}
	for i, pc := range wait {
		select {
		case <-pc.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if pc.err != nil {
			return nil, pc.err
		}
		if !pc.present || pc.gen != pr.gen.current() {
			missing = append(missing, waitPaths[i])
		}
	}
	return missing, nil
}

// prefetch asks about paths in bulk, in the background: the paths are
// marked as being asked about before it returns, so that a job asking about
// one of them a moment later waits for this answer instead of asking again.
// The answers "missing" are kept briefly for those jobs (see absent).
func (pr *presence) prefetch(ctx context.Context, paths []string, before func() error) {
	var mine []string
	pr.mu.Lock()
	now := time.Now()
	for _, p := range paths {
		h := storepath.HashPart(p)
		if pr.trustedLocked(h, now) {
			continue
		}
		if _, ok := pr.pending[h]; ok {
			continue
		}
		pr.pending[h] = &pendingCheck{done: make(chan struct{})}
		mine = append(mine, p)
	}
	pr.mu.Unlock()
	if len(mine) == 0 {
		return
	}
	go func() {
		start := time.Now()
		var found []string
		err := before()
		gen, asked := pr.gen.current(), time.Now()
		if err == nil {
			found, err = pr.ask(ctx, mine)
		}
		pr.markIn(found, gen, asked)
		foundSet := make(map[string]bool, len(found))
		for _, p := range found {
			foundSet[p] = true
		}
		missing := 0
		pr.mu.Lock()
		now := time.Now()
		for _, p := range mine {
			h := storepath.HashPart(p)
			pc := pr.pending[h]
			delete(pr.pending, h)
			pc.present, pc.gen, pc.err = foundSet[p], gen, err
			close(pc.done)
			if err == nil && !foundSet[p] {
				missing++
				if len(pr.absent) < maxAbsent {
					pr.absent[h] = now
				}
			}
		}
		pr.mu.Unlock()
		if err != nil {
			pr.log.Debug("presence checked in bulk", "paths", len(mine), "err", err)
			return
		}
		pr.log.Info("presence checked in bulk", "paths", len(mine), "missing", missing, "duration", time.Since(start))
	}()
}

// trustedLocked reports whether the cache is known to have hash h's
// narinfo: remembered within the TTL and not announced for deletion.
func (pr *presence) trustedLocked(h string, now time.Time) bool {
	at, ok := pr.known[h]
	return ok && now.Sub(time.Unix(at, 0)) <= pr.ttl && !pr.doomedLocked(h)
}

func (pr *presence) doomedLocked(h string) bool {
	g := pr.guard
	return g != nil && g.Doomed(cachefmt.Keys.Narinfo(h))
}

// listingWorthIt decides between a HEAD per path and listing the hash
// prefixes the paths fall under, from the estimated size of the cache. A
// store that says it cannot list (an HTTP binary cache) is asked by HEAD
// only.
func (pr *presence) listingWorthIt(paths []string) bool {
	if len(paths) < 32 || pr.unlistable.Load() || bucket.CheckListable(pr.bucket) != nil {
		return false
	}
	prefixes := map[byte]bool{}
	for _, p := range paths {
		prefixes[storepath.HashPart(p)[0]] = true
	}
	keys := pr.bucketKeys.Load()
	pagesPerPrefix := max(int64(1), (keys/32+999)/1000)
	return int64(len(prefixes))*pagesPerPrefix*4 <= int64(len(paths))
}

// ask asks the cache about paths and returns those it holds.
func (pr *presence) ask(ctx context.Context, paths []string) ([]string, error) {
	if len(paths) == 0 {
		return nil, nil
	}
	if pr.listingWorthIt(paths) {
		found, err := pr.askByListing(ctx, paths)
		if err == nil {
			// Shortly after a reset a lagging listing may still show what
			// the reset deleted: in a young cache what it shows is asked
			// again by HEAD. What it does not show counts as missing, as a
			// HEAD's "not found" does: the upload of a path that is there
			// after all costs a create-only write that keeps it.
			storeNow, _ := bucket.NowWithin(pr.bucket)
			if pr.young(storeNow, youngCache) {
				return pr.askByHead(ctx, found)
			}
			return found, nil
		}
		if errors.Is(err, bucket.ErrUnavailable) || ctx.Err() != nil || !(bucket.IsNotExist(err) || bucket.IsPermanent(err)) {
			return nil, err
		}
		if !pr.unlistable.Swap(true) {
			pr.log.Warn("the bucket cannot be listed with this cache URL; asking about paths one by one (HEAD)", "err", err)
		}
	}
	return pr.askByHead(ctx, paths)
}

func (pr *presence) askByHead(ctx context.Context, paths []string) ([]string, error) {
	var mu sync.Mutex
	var found []string
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(64) // the bucket's window bounds what is really in flight
	for _, p := range paths {
		g.Go(func() error {
			if err := gctx.Err(); err != nil {
				return err // an earlier HEAD failed: send no more
			}
			have, err := hasNarinfo(gctx, pr.bucket, p)
			if err != nil {
				return err
			}
			if have {
				mu.Lock()
				found = append(found, p)
				mu.Unlock()
			}
			return nil
		})
	}
	return found, g.Wait()
}

func (pr *presence) askByListing(ctx context.Context, paths []string) ([]string, error) {
	want := map[string]string{} // hash → path
	prefixes := map[byte]bool{}
	for _, p := range paths {
		h := storepath.HashPart(p)
		want[h] = p
		prefixes[h[0]] = true
	}
	var mu sync.Mutex
	var found []string
	var seen atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	for c := range prefixes {
		g.Go(func() error {
			return pr.bucket.List(gctx, bucket.ListOptions{Prefix: string(c)}, func(o bucket.Object) error {
				seen.Add(1)
				if h := cachefmt.Keys.NarinfoHash(o.Key); h != "" {
					if p, ok := want[h]; ok {
						mu.Lock()
						found = append(found, p)
						mu.Unlock()
					}
				}
				return nil
			})
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	pr.bucketKeys.Store(seen.Load() * 32 / int64(len(prefixes)))
	pr.log.Debug("presence by listing", "paths", len(paths), "prefixes", len(prefixes), "keys_listed", seen.Load(), "found", len(found))
	return found, nil
}

// hasNarinfo asks b (a HEAD) whether p's narinfo exists.
func hasNarinfo(ctx context.Context, b bucket.Bucket, p string) (bool, error) {
	_, err := b.Stat(ctx, cachefmt.Keys.NarinfoOf(p))
	switch {
	case err == nil:
		return true, nil
	case bucket.IsNotExist(err):
		return false, nil
	default:
		return false, err
	}
}

// errReset is returned for uploads planned in an earlier generation of the
// cache: what they believed present may be gone.
var errReset = errors.New("the cache was reset while this upload was under way; starting over")
