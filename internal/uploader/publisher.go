package uploader

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
)

// publisher writes what makes a path visible to Nix clients once its NAR
// is up: its narinfo, then its realisations (realiser.go) and build log
// (logs.go). It keeps the rules every such write obeys: the generation
// rule (generation.go), the garbage collector's guard (guard.go), and
// create-only writes (a narinfo or realisation already in the cache is
// never replaced, except a narinfo found broken; see replaceBrokenNarinfo).
type publisher struct {
	bucket   bucket.Bucket // through the request window
	direct   bucket.Bucket // the same bucket without it (guardedWrite)
	guard    Guard         // nil without a collector
	gen      *generation
	presence *presence
	realiser Realiser // nil: no realisations are written
	cache    *cacheurl.Cache
	logs     *buildLogs // nil: build logs are not uploaded
	extras   *writtenExtras
	log      *slog.Logger

	conditional atomic.Int32 // condUnknown, condYes, condNo
}

// publisherConfig is what the publisher needs from the uploader's options.
type publisherConfig struct {
	bucket   bucket.Bucket
	guard    Guard
	realiser Realiser
	cache    *cacheurl.Cache
	logs     *buildLogs
	extras   *writtenExtras
	log      *slog.Logger
}

func newPublisher(c publisherConfig, gen *generation, pr *presence) *publisher {
	return &publisher{bucket: c.bucket, direct: bucket.Direct(c.bucket), guard: c.guard, gen: gen, presence: pr,
		realiser: c.realiser, cache: c.cache, logs: c.logs, extras: c.extras, log: c.log}
}

// published is what publishing one node did.
type published struct {
	started time.Time // when its narinfo write began
	wrote   bool      // this call wrote the narinfo (else another writer's was kept)
	extras  int       // realisations written
}

// publish writes n's narinfo (and what follows it), once its NAR is up and
// its references' narinfos are written.
func (pub *publisher) publish(ctx context.Context, n *node) (published, error) {
	// The generation rule: a narinfo is written only if the cache is
	// confirmed to be the generation the upload was planned in by a
	// question sent after the last object it depends on was written or
	// found present (dependsSince). A reset before that question makes
	// the upload start over; one after it is caught by settle.
	if err := pub.gen.confirmAfter(ctx, n.dependsSince); err != nil {
		return published{}, err
	}
	if n.gen != pub.gen.current() {
		return published{}, errReset
	}
	// With a collector at work: nothing this narinfo relies on (its NAR,
	// its references' narinfos) is about to be deleted.
	within, err := pub.guardNarinfo(ctx, n.info.Path, n.ni.URL, n.ni.References)
	if err != nil {
		return published{}, err
	}
	res := published{started: time.Now()}
	err = pub.guardedWrite(ctx, within, func(ctx context.Context, b bucket.Bucket) (err error) {
		res.wrote, err = pub.putNarinfo(ctx, b, n.ni)
		if err == nil && !res.wrote && (n.repair.Load() || pub.presence.doubted(n.info.Path)) {
			res.wrote, err = pub.replaceBrokenNarinfo(ctx, b, n.ni)
		}
		return err
	})
	if err != nil {
		return published{}, err
	}
	res.extras, err = pub.writeRealisations(ctx, n.info)
	if err != nil {
		return published{}, err
	}
	if pub.logs != nil && n.info.Deriver != "" {
		pub.logs.upload(ctx, n.info.Deriver)
	}
	return res, nil
}

// putNarinfo writes ni's narinfo unless the cache already has one: like
// Nix, nixspool never replaces a narinfo (another machine's signatures would
// be lost). It reports whether this call wrote it.
func (pub *publisher) putNarinfo(ctx context.Context, b bucket.Bucket, ni *narinfo.NarInfo) (bool, error) {
	body, err := compressMeta(pub.cache.NarinfoCompression, []byte(ni.String()))
	if err != nil {
		return false, err
	}
	return pub.putNew(ctx, b, cachefmt.Keys.NarinfoOf(ni.StorePath), body,
		bucket.PutOptions{ContentType: "text/x-nix-narinfo", ContentEncoding: pub.cache.NarinfoCompression})
}

// replaceBrokenNarinfo handles a doubted path whose create-only narinfo
// write found one there: if that narinfo names a NAR that is not there
// (written across a reset, with a NAR that differs from the one just
// uploaded), ni replaces it, and it reports true. A complete narinfo is
// kept, as any other writer's. Where the store honours If-Match only the
// broken version is replaced; a concurrent change makes the write fail,
// and the retry looks again.
func (pub *publisher) replaceBrokenNarinfo(ctx context.Context, b bucket.Bucket, ni *narinfo.NarInfo) (bool, error) {
	complete, etag, err := pub.narinfoState(ctx, b, ni.StorePath)
	if err != nil || complete {
		return false, err
	}
	if etag == "" { // gone meanwhile
		return pub.putNarinfo(ctx, b, ni)
	}
	body, err := compressMeta(pub.cache.NarinfoCompression, []byte(ni.String()))
	if err != nil {
		return false, err
	}
	opts := bucket.PutOptions{ContentType: "text/x-nix-narinfo", ContentEncoding: pub.cache.NarinfoCompression, IfMatch: etag}
	key := narinfoKey(ni.StorePath)
	_, err = b.Put(ctx, key, bytes.NewReader(body), int64(len(body)), opts)
	if bucket.IsPermanent(err) && !bucket.IsPrecondition(err) {
		// The store refuses If-Match: replace it plainly (a writer racing
		// in between can be overwritten, the store's limit).
		opts.IfMatch = ""
		_, err = b.Put(ctx, key, bytes.NewReader(body), int64(len(body)), opts)
	}
	if bucket.IsPrecondition(err) {
		return false, fmt.Errorf("replace the broken narinfo of %s: it changed meanwhile", ni.StorePath)
	}
	if err != nil {
		return false, fmt.Errorf("replace the broken narinfo of %s: %w", ni.StorePath, err)
	}
	pub.log.Warn("replaced a narinfo that named a missing NAR", "path", ni.StorePath, "nar", ni.URL)
	return true, nil
}

// narinfoComplete reports whether p's narinfo is in the cache, parses,
// and names a NAR object of the size it claims.
func (pub *publisher) narinfoComplete(ctx context.Context, p string) (bool, error) {
	ok, _, err := pub.narinfoState(ctx, pub.bucket, p)
	return ok, err
}

// narinfoState is narinfoComplete on b, and also returns the ETag of the
// narinfo it read ("" if there is none).
func (pub *publisher) narinfoState(ctx context.Context, b bucket.Bucket, p string) (complete bool, etag string, err error) {
	data, info, err := b.Get(ctx, narinfoKey(p), cachefmt.MaxNarinfoSize)
	if bucket.IsNotExist(err) {
		return false, "", nil
	}
	if err != nil {
		return false, "", fmt.Errorf("read narinfo of %s: %w", p, err)
	}
	plain, err := cachefmt.DecodeContentEncoding(info.ContentEncoding, data)
	if err != nil {
		return false, info.ETag, nil
	}
	ni, err := cachefmt.ParseNarInfo(plain)
	if err != nil {
		return false, info.ETag, nil
	}
	st, err := b.Stat(ctx, ni.URL)
	switch {
	case bucket.IsNotExist(err):
		pub.log.Warn("narinfo in the cache names a NAR that is not there (written across a reset); uploading the path again", "path", p, "nar", ni.URL)
		return false, info.ETag, nil
	case err != nil:
		return false, "", fmt.Errorf("check NAR of %s: %w", p, err)
	}
	return ni.FileSize < 0 || st.Size == ni.FileSize, info.ETag, nil
}

// putNew writes an object only if the key does not exist yet, and reports
// whether it wrote it. With a store that honours create-only writes the
// check and the write are one request (If-None-Match); with one that does
// not, a HEAD comes first (a writer racing in between can still be
// overwritten: the store's limit).
func (pub *publisher) putNew(ctx context.Context, b bucket.Bucket, key string, body []byte, opts bucket.PutOptions) (bool, error) {
	cond, err := pub.conditionalWrites(ctx)
	if err != nil {
		// Not knowing, a plain write could replace another writer's
		// object: retried later instead.
		return false, err
	}
	if cond {
		opts.IfNoneMatch = true
	} else {
		if _, err := b.Stat(ctx, key); err == nil {
			return false, nil
		} else if !bucket.IsNotExist(err) {
			return false, err
		}
	}
	_, err = b.Put(ctx, key, bytes.NewReader(body), int64(len(body)), opts)
	if bucket.IsPrecondition(err) {
		return false, nil
	}
	return err == nil, err
}

// conditionalWrites reports whether the store honours create-only writes,
// probing it the first time (and again after a probe that could not tell:
// then the error says why, and nothing that must not replace an object is
// written until a probe can tell).
func (pub *publisher) conditionalWrites(ctx context.Context) (bool, error) {
	switch pub.conditional.Load() {
	case condYes:
		return true, nil
	case condNo:
		return false, nil
	}
	ok, err := bucket.ProbeConditional(ctx, pub.bucket, "nixspool/probe/")
	if err != nil && bucket.IsPermanent(err) && !bucket.IsPrecondition(err) {
		// The probe's key itself is refused for good (a bucket policy
		// denying writes under nixspool/probe/, say): no probe will ever
		// tell, so look before writing, as for a store without them.
		pub.conditional.Store(condNo)
		pub.log.Warn("the create-only probe's writes are refused; narinfos are checked with a HEAD before they are written", "cache", pub.cache.String(), "err", err)
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("cannot tell whether the store honours create-only writes: %w", err)
	}
	if ok {
		pub.conditional.Store(condYes)
	} else {
		pub.conditional.Store(condNo)
		pub.log.Warn("the store does not honour create-only writes (If-None-Match); narinfos are checked with a HEAD before they are written, so two machines writing the same path at the same instant can still replace each other's narinfo", "cache", pub.cache.String())
	}
	return ok, nil
}

const (
	condUnknown int32 = iota
	condYes
	condNo
)

// forgetRealisations drops the record of realisations written: they went
// with the cache (a reset), or may go with narinfos a collector announced.
func (pub *publisher) forgetRealisations() { pub.extras.clear() }

// pruneLogs bounds the record of build logs uploaded.
func (pub *publisher) pruneLogs() {
	if pub.logs != nil {
		pub.logs.prune()
	}
}
