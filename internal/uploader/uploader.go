// Package uploader turns store paths into binary cache objects that stock Nix
// accepts: for a path P it finds which paths of P's closure the cache lacks,
// streams each missing path's NAR through hashing and compression, uploads
// the NAR, and writes the signed narinfo last.
//
// Invariants it keeps (docs/robustness.md lists them with the harness that
// checks them):
//   - a narinfo is written only after its NAR is complete and after the
//     narinfos of all its references exist in the cache;
//   - a narinfo already in the cache is never replaced (another machine's
//     signatures would be lost): writes are create-only;
//   - the generation rule: a narinfo is written only if the cache is
//     confirmed to be the same generation (not reset) by a question sent
//     after the last object it depends on was written or found present,
//     and an upload counts as done only after one more such question,
//     sent after its last write (settle). Narinfos an upload wrote into a
//     cache that turned out to be reset are doubted and put back in order
//     by the retry; in a cache created or reset less than youngCache ago,
//     a closure's present narinfos are checked to name a NAR that is there
//     (once per generation), in case their writer crashed before it could
//     repair them. With a garbage collector at work, nothing a narinfo
//     relies on may be about to be deleted (Guard);
//   - a NAR whose streamed hash differs from the store's NarHash is never
//     uploaded (a permanent error naming both hashes), and a NAR stream is
//     cut one byte past the recorded NarSize;
//   - memory does not grow with NAR size or with the closure's shape: small
//     NARs are compressed in memory within a fixed byte budget, large ones
//     into a temp file, a few at a time, and all NAR work runs on a fixed set
//     of workers (see graph.go); requests in flight are bounded by the
//     bucket's adaptive window (bucket/limit).
//
// Assumptions these arguments rest on, and where each is checked:
//   - reads are consistent with writes: a GET or HEAD after a completed PUT
//     or DELETE sees it (S3 since 2020, MinIO, versitygw, file://; the
//     bucket contract suite checks it on each);
//   - a reset of the cache replaces nix-cache-info, whose identity (ETag
//     and Last-Modified; nixspool's writes carry a random field so that
//     two writes never share an ETag) names the generation. A reset that
//     keeps nix-cache-info is not one: `agentctl forget` is for that;
//   - create-only writes (If-None-Match) are honoured, or the store is
//     probed and found not to honour them, and then a HEAD comes first
//     (agentctl doctor: "conditional writes"); two writers racing on such
//     a store may overwrite each other's identical bytes;
//   - compression of the same NAR with the same settings gives the same
//     bytes, so a NAR put back after a reset lands at the key its doubted
//     narinfo names (the harness's final audit checks it);
//   - listings used for presence may lag (a narinfo missing from one is
//     uploaded again; the write is create-only), and are not trusted over
//     a reset: answers asked before a generation change are dropped.
//
// Filters: paths signed by an upstream cache's key (Upstream) count as
// present and are never uploaded: clients get them from the upstream cache.
// Exclusions (Exclude: name patterns, size limits) apply to the path a job
// is for; a path that is excluded but needed by a path being uploaded is
// uploaded anyway, so that no narinfo ever names a reference the cache
// cannot serve.
package uploader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
)

// MetadataSource gives store path metadata (nixstore.Store implements it).
type MetadataSource interface {
	// QueryPathInfo returns p's metadata, or nil if p is not valid.
	QueryPathInfo(ctx context.Context, p string) (*nixstore.PathInfo, error)
	// Closure returns the closure of p, dependencies first.
	Closure(ctx context.Context, p string) ([]*nixstore.PathInfo, error)
}

// Options configure an Uploader.
type Options struct {
	Bucket  bucket.Bucket
	Cache   *cacheurl.Cache
	Store   MetadataSource
	Keys    []signature.SecretKey
	TempDir string // for compressed NARs before upload; emptied by New
	// Workers is how many NARs are worked on at once (default 64). Each
	// holds at most one request; the bucket's window decides how many are
	// really in flight.
	Workers int
	// Streams bounds how many large (≥ 1 MiB) NARs are compressed at once;
	// each already uses two cores (default 2). Four times as many may be
	// uploading (each holds a temp file).
	Streams int
	// SmallBudget bounds the bytes of small NARs held in memory at once
	// (default 32 MiB).
	SmallBudget int64
	Logger      *slog.Logger
	// Upstream, if set, reports paths clients get from an upstream cache
	// (signed by its key): they count as present and are never uploaded.
	Upstream func(*nixstore.PathInfo) bool
	// Exclude, if set, reports paths not to upload when a job is for them.
	// A path another uploaded path needs is uploaded regardless.
	Exclude func(*nixstore.PathInfo) bool
	// Presence, if set, keeps the presence cache across restarts.
	Presence PresenceStore
	// PresenceTTL is how long a "the cache has it" is trusted (default
	// DefaultPresenceTTL).
	PresenceTTL time.Duration
	// Resume keeps the records that let a large multipart upload resume
	// after a crash (the queue database implements it). Nil disables resume.
	Resume ResumeStore
	// ResumeAbove is the NAR size from which uploads are resumable
	// (default 64 MiB).
	ResumeAbove int64
	// UploadLogs uploads the build log of each uploaded path's deriver,
	// read from LogDir (default /nix/var/log/nix).
	UploadLogs bool
	LogDir     string
	// Guard, if set, coordinates with a garbage collector of the cache.
	Guard Guard
	// Realiser, if set, supplies realisations written after narinfos.
	Realiser Realiser
	// GenerationCheck bounds how long uploads go on without confirming
	// that the cache was not reset (default 30 s).
	GenerationCheck time.Duration
}

// ResumeStore durably keeps one opaque record per store path.
type ResumeStore interface {
	SaveUpload(path string, record []byte) error
	LoadUpload(path string) ([]byte, error)
	DeleteUpload(path string) error
	Uploads() (map[string][]byte, error)
}

// Uploader uploads closures. It is safe for concurrent use: a dependency
// shared by concurrent uploads is uploaded once.
type Uploader struct {
	opt       Options
	nars      *narTransfer // NAR compression and upload (nar.go, resume.go)
	gen       *generation  // the cache generation rule (generation.go)
	presence  *presence
	graph     *graph
	pub       *publisher // narinfo, realisation and build log writes (publisher.go)
	cacheInfo *cacheInfo // nix-cache-info (cacheinfo.go)
	fresh     singleflight.Group
	// deterministic: the same NAR compresses to the same bytes (checked
	// once at start, in the background; see the package comment).
	deterministic atomic.Int32 // condUnknown, condYes, condNo
	log           *slog.Logger
}

// Result sums what one Upload call uploaded.
type Result struct {
	Paths     int // narinfos written
	NARBytes  uint64
	FileBytes uint64 // compressed bytes sent
	// Skipped counts paths not uploaded because of a filter: the job's
	// path if excluded, and upstream paths of its closure.
	Skipped int
	// SelfSkipped: the path itself was left out by a filter (nothing of
	// it, realisations included, may be written).
	SelfSkipped bool
	// Kept counts narinfos another writer put in place while this upload
	// ran (left as they were).
	Kept int
	// Realisations counts the realisation objects written (Options.Realiser).
	Realisations int
}

// New returns an Uploader and removes temp files an earlier run left.
func New(opt Options) (*Uploader, error) {
	if opt.Streams <= 0 {
		opt.Streams = 2
	}
	if opt.Workers <= 0 {
		opt.Workers = 64
	}
	if opt.SmallBudget <= 0 {
		opt.SmallBudget = 32 << 20
	}
	if opt.ResumeAbove <= 0 {
		opt.ResumeAbove = 64 << 20
	}
	if opt.GenerationCheck <= 0 {
		opt.GenerationCheck = 30 * time.Second
	}
	if opt.PresenceTTL <= 0 {
		opt.PresenceTTL = DefaultPresenceTTL
	}
	if opt.LogDir == "" {
		opt.LogDir = DefaultLogDir
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	comp, err := newNARCompressorThreads(opt.Cache.Compression, opt.Cache.CompressionLevel, opt.Cache.ParallelCompression)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opt.TempDir, 0o700); err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	if old, _ := filepath.Glob(filepath.Join(opt.TempDir, "nar-*.tmp")); len(old) > 0 {
		for _, f := range old {
			os.Remove(f)
		}
		opt.Logger.Info("removed orphaned temp files", "count", len(old))
	}
	u := &Uploader{
		opt:  opt,
		nars: newNARTransfer(opt, comp),
		log:  opt.Logger,
	}
	go u.checkDeterministic()
	u.gen = &generation{check: u.CheckGeneration, every: opt.GenerationCheck}
	extras := &writtenExtras{} // what went with the cache on a reset: the realisations written
	u.presence = newPresence(presenceConfig{bucket: opt.Bucket, guard: opt.Guard, store: opt.Presence, ttl: opt.PresenceTTL,
		cacheID: opt.Cache.Identity(), cacheName: opt.Cache.String(), onReset: extras.clear, log: opt.Logger}, u.gen)
	var logs *buildLogs
	if opt.UploadLogs {
		logs = newBuildLogs(opt.Bucket, opt.LogDir, opt.Cache.LogCompression, opt.Logger)
	}
	u.pub = newPublisher(publisherConfig{bucket: opt.Bucket, guard: opt.Guard, realiser: opt.Realiser, cache: opt.Cache,
		logs: logs, extras: extras, log: opt.Logger}, u.gen, u.presence)
	u.cacheInfo = &cacheInfo{bucket: opt.Bucket, cache: opt.Cache, putNew: u.pub.putNew, log: opt.Logger}
	u.graph = newGraph(graphTasks{nar: u.runNAR, narinfo: u.runNarinfo, large: u.nars.isLarge}, u.presence, opt.Workers, 4*opt.Streams)
	return u, nil
}

// Close stops the uploader: uploads in progress are cancelled, and it
// returns once its workers have stopped.
func (u *Uploader) Close() { u.graph.close() }

// InProgress returns the NARs being streamed now.
func (u *Uploader) InProgress() []*Progress {
	var out []*Progress
	u.nars.progress.Range(func(_, v any) bool {
		out = append(out, v.(*Progress))
		return true
	})
	return out
}

// EnsureCacheInfo makes sure nix-cache-info exists at the cache root
// (writing it if missing) and learns the cache's generation from it. Once
// it has succeeded it costs nothing until CheckGeneration runs.
func (u *Uploader) EnsureCacheInfo(ctx context.Context) error {
	if u.cacheInfo.known.Load() {
		return nil
	}
	// Workers starting at once share one look (and at most one write),
	// under a context of its own: a cancelled first caller must not fail
	// the others.
	_, err, _ := u.fresh.Do("ensure", func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ensureCacheInfoTimeout)
		defer cancel()
		if u.cacheInfo.known.Load() {
			return nil, nil
		}
		err := u.readGeneration(ctx, nil)
		var pe *presenceError
		if errors.As(err, &pe) {
			u.log.Warn("presence cache", "err", pe.err)
			return nil, nil
		}
		return nil, err
	})
	return err
}

// readGeneration reads nix-cache-info, writing it if it is missing (after
// calling missing, if set), and records the generation it names. An error
// of the presence records is returned as a *presenceError.
func (u *Uploader) readGeneration(ctx context.Context, missing func()) error {
	asked := time.Now()
	info, err := u.cacheInfo.read(ctx, missing)
	if err != nil {
		return err
	}
	u.gen.setBorn(info.LastModified)
	_, err = u.presence.setGeneration(generationName(info), asked)
	u.cacheInfo.known.Store(true)
	if err != nil {
		return &presenceError{err}
	}
	return nil
}

// presenceError: the generation was read, but the presence records on disk
// could not be loaded or forgotten.
type presenceError struct{ err error }

func (e *presenceError) Error() string { return "presence cache: " + e.err.Error() }
func (e *presenceError) Unwrap() error { return e.err }

// ensureCacheInfoTimeout bounds the shared look at nix-cache-info.
const ensureCacheInfoTimeout = 2 * time.Minute

// CheckGeneration asks the cache whether it is the same cache as before (a
// real round trip): if its nix-cache-info changed or vanished, everything
// known about its contents is forgotten (and nix-cache-info written again).
func (u *Uploader) CheckGeneration(ctx context.Context) error {
	_, err, _ := u.fresh.Do("generation", func() (any, error) {
		return nil, u.readGeneration(ctx, func() {
			u.log.Warn("nix-cache-info is gone: the cache was emptied; forgetting what it held", "cache", u.opt.Cache.String())
			if rerr := u.presence.reset(); rerr != nil {
				u.log.Warn("presence cache", "err", rerr)
			}
		})
	})
	return err
}

// Probe asks the cache for nix-cache-info (writing it if missing): a real
// round trip, to learn whether the bucket is back after an outage.
func (u *Uploader) Probe(ctx context.Context) error {
	return u.CheckGeneration(ctx)
}

// ensureFresh makes sure nix-cache-info exists and the generation was
// confirmed recently.
func (u *Uploader) ensureFresh(ctx context.Context) error {
	if !u.cacheInfo.known.Load() {
		return u.EnsureCacheInfo(ctx)
	}
	if u.gen.due() {
		return u.CheckGeneration(ctx)
	}
	return nil
}

// Upload makes path and its whole closure available in the cache.
func (u *Uploader) Upload(ctx context.Context, path string) (Result, error) {
	if err := u.ensureFresh(ctx); err != nil {
		return Result{}, err
	}
	info, err := u.opt.Store.QueryPathInfo(ctx, path)
	if err != nil {
		return Result{}, err
	}
	if info == nil {
		return Result{}, u.goneFromStore(ctx, path)
	}
	if u.isUpstream(info) || (u.opt.Exclude != nil && u.opt.Exclude(info)) {
		return Result{Skipped: 1, SelfSkipped: true}, nil
	}
	gen := u.gen.current()
	// In a young cache (created or reset less than youngCache ago), a
	// narinfo may be there without its references: written by an agent
	// that had not noticed the reset yet, and not repaired by it yet. There
	// a present path's closure is checked too, and what it lacks uploaded.
	storeNow, _ := bucket.NowWithin(u.opt.Bucket)
	young := u.presence.young(storeNow, youngCache)
	// The path itself first: if its narinfo is there, its closure is too
	// (and only its realisations may be missing: a failed attempt, or a
	// second derivation with the same output).
	if !young && u.presence.has(path) {
		return u.present(ctx, gen, info)
	}
	missing, err := u.missingTop(ctx, path)
	if err != nil {
		return Result{}, err
	}
	if len(missing) == 0 && !young {
		return u.present(ctx, gen, info)
	}
	return u.uploadClosure(ctx, gen, young, info, missing)
}

// goneFromStore ends the upload of a path the store no longer has. If it
// reached the cache before (an acknowledgement lost in a crash), the job is
// done after all.
func (u *Uploader) goneFromStore(ctx context.Context, path string) error {
	asked, gen := time.Now(), u.gen.current()
	have, herr := u.pub.presentTop(ctx, path) // asked for again: revived if doomed
	if herr == nil && have {
		u.presence.mark([]string{path}, asked)
		return u.settle(ctx, gen, time.Now(), nil)
	}
	if herr != nil && u.pub.doomed(path) {
		return herr // a collector holds it back: transient
	}
	return Permanent(&nixstore.InvalidPathError{Path: path})
}

// missingTop returns path if the cache lacks its narinfo (or must be
// given it again), nil if it holds it.
func (u *Uploader) missingTop(ctx context.Context, path string) ([]string, error) {
	missing, err := u.presence.check(ctx, []string{path})
	if err != nil || len(missing) > 0 || !u.pub.doomed(path) {
		return missing, err
	}
	// A collector announced it, and it was just built or pushed again:
	// rewrite its narinfo so that it stays (or, if it is gone meanwhile,
	// upload it again).
	revived, err := u.pub.revive(ctx, path)
	if err != nil {
		return nil, err
	}
	if !revived {
		u.presence.forget([]string{path})
		return []string{path}, nil
	}
	return nil, nil
}

// uploadClosure uploads what info's closure lacks (missing: info's own
// path, if the cache lacks it), planned in generation gen; in a young
// cache, present narinfos that name no NAR are repaired too.
func (u *Uploader) uploadClosure(ctx context.Context, gen uint64, young bool, info *nixstore.PathInfo, missing []string) (Result, error) {
	path := info.Path
	closure, deps, skipped, err := u.closureDeps(ctx, path)
	if err != nil {
		return Result{}, err
	}
	missingDeps, err := u.presence.check(ctx, deps)
	if err != nil {
		return Result{}, err
	}
	var broken []string
	if young {
		// Narinfos written across a reset may lack their NAR: the paths
		// found present are checked (once per generation), and those
		// lacking it are uploaded again.
		broken, err = u.verifyPresent(ctx, closure, append(missingDeps, missing...))
		if err != nil {
			return Result{}, err
		}
		if len(broken) > 0 {
			u.presence.doubt(broken)
			missingDeps = append(missingDeps, broken...)
			if slices.Contains(broken, path) {
				missing = append(missing, path)
			}
		}
	}
	want := setOf(missingDeps)
	if len(missing) > 0 {
		want[path] = true
	}
	job := &jobResult{}
	// With top nil (the path is there: uploaded by another job meanwhile,
	// or only its closure lacked something) the job waits for the nodes
	// its closure needs all the same.
	interest, top, _ := u.graph.plan(job, closure, want, setOf(broken), u.opt.Upstream, gen)
	defer u.graph.release(interest)
	failed, err := waitNodes(ctx, interest, top)
	if err != nil {
		return Result{}, err
	}
	job.mu.Lock()
	res := job.res
	job.mu.Unlock()
	res.Skipped += skipped
	if failed != nil {
		return res, failed
	}
	if err := u.finishClosure(ctx, gen, info, closure, interest, top, broken, &res); err != nil {
		return res, err
	}
	return res, nil
}

// closureDeps returns path's closure, the paths of it other than path that
// may need an upload (not upstream), and how many are upstream.
func (u *Uploader) closureDeps(ctx context.Context, path string) (closure []*nixstore.PathInfo, deps []string, skipped int, err error) {
	closure, err = u.opt.Store.Closure(ctx, path)
	if err != nil {
		var inv *nixstore.InvalidPathError
		if errors.As(err, &inv) {
			return nil, nil, 0, Permanent(err)
		}
		return nil, nil, 0, err
	}
	for _, i := range closure[:len(closure)-1] {
		if u.isUpstream(i) {
			skipped++
			continue
		}
		deps = append(deps, i.Path)
	}
	return closure, deps, skipped, nil
}

// waitNodes waits for the nodes a job planned: the top first (its failure
// ends the job at once), then every other node the closure needs: a
// repaired dependency of a present path (see verifyPresent) is no
// reference of any node planned here, and nothing else waits for it. It
// returns the first node error found, or ctx's error.
func waitNodes(ctx context.Context, interest []*node, top *node) (failed, err error) {
	wait := interest
	if top != nil {
		wait = append([]*node{top}, slices.DeleteFunc(slices.Clone(interest), func(n *node) bool { return n == top })...)
	}
	for _, n := range wait {
		select {
		case <-n.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if n.err != nil {
			return n.err, nil
		}
	}
	return nil, nil
}

// finishClosure ends a job whose nodes all succeeded: the realisations of
// a path this job did not upload itself (top nil), the check that repaired
// narinfos are whole, the acknowledgement's generation check (settle), and
// the release of resume state nothing will use.
func (u *Uploader) finishClosure(ctx context.Context, gen uint64, info *nixstore.PathInfo, closure []*nixstore.PathInfo, interest []*node, top *node, broken []string, res *Result) error {
	if top == nil {
		n, err := u.pub.putRealisations(ctx, info)
		if err != nil {
			return err
		}
		res.Realisations += n
	}
	// A broken narinfo may still be there: kept by a node that wrote or
	// found it before this job marked it for repair. Never acknowledged.
	for _, p := range broken {
		ok, err := u.pub.narinfoComplete(ctx, p)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("the narinfo of %s still names a NAR that is not there; retrying", p)
		}
	}
	var wrote []string
	for _, n := range interest {
		wrote = append(wrote, n.info.Path)
	}
	if err := u.settle(ctx, gen, time.Now(), wrote); err != nil {
		return err
	}
	// Dependencies found present may have records of uploads a crash
	// interrupted.
	u.releaseIfPresent(ctx, info.Path, closure)
	return nil
}

func setOf(paths []string) map[string]bool {
	m := make(map[string]bool, len(paths))
	for _, p := range paths {
		m[p] = true
	}
	return m
}

// verifyPresent checks, for the paths of closure not in absent (and not
// upstream), that the narinfo names a NAR object of the size it claims,
// once per generation per path, and returns the paths where it does not.
func (u *Uploader) verifyPresent(ctx context.Context, closure []*nixstore.PathInfo, absent []string) ([]string, error) {
	skip := make(map[string]bool, len(absent))
	for _, p := range absent {
		skip[p] = true
	}
	var mu sync.Mutex
	var broken []string
	gen := u.gen.current()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, info := range closure {
		p := info.Path
		if skip[p] || u.isUpstream(info) || u.presence.verified(p) {
			continue
		}
		g.Go(func() error {
			ok, err := u.pub.narinfoComplete(gctx, p)
			if err != nil {
				return err
			}
			if !ok {
				mu.Lock()
				broken = append(broken, p)
				mu.Unlock()
				return nil
			}
			u.presence.markVerified(p, gen)
			return nil
		})
	}
	return broken, g.Wait()
}

// youngCache is how long after its creation or reset a cache's narinfos
// are not trusted to come with their closure (see Upload).
const youngCache = 10 * time.Minute

// present finishes the upload of a path the cache holds: its realisations,
// the acknowledgement's generation check, and the release of resume state
// nothing will use.
func (u *Uploader) present(ctx context.Context, gen uint64, info *nixstore.PathInfo) (Result, error) {
	n, err := u.pub.putRealisations(ctx, info)
	if err != nil {
		return Result{}, err
	}
	if err := u.settle(ctx, gen, time.Now(), nil); err != nil {
		return Result{}, err
	}
	u.releaseIfPresent(ctx, info.Path, nil)
	return Result{Realisations: n}, nil
}

// settle is the last step of every successful Upload: the answer "the
// cache has it" holds only if the cache is still the generation the upload
// began in, confirmed by a question sent after the upload's last write
// (since). Concurrent uploads share one question. If the cache was reset
// meanwhile, the narinfos the upload wrote (wrote) may have landed in the
// emptied bucket without what they need: they are doubted, so that the
// retry puts it back, and the upload counts as not done.
func (u *Uploader) settle(ctx context.Context, gen uint64, since time.Time, wrote []string) error {
	if err := u.gen.confirmAfter(ctx, since); err != nil {
		return err
	}
	if u.gen.current() != gen {
		u.presence.doubt(wrote)
		return errReset
	}
	for _, p := range wrote {
		u.presence.settled(p) // written, and confirmed in this generation
	}
	return nil
}

func (u *Uploader) isUpstream(info *nixstore.PathInfo) bool {
	return u.opt.Upstream != nil && u.opt.Upstream(info)
}

// runNAR is the first task of a node: its NAR.
func (u *Uploader) runNAR(n *node) {
	if err := n.ctx.Err(); err != nil {
		u.graph.fail(n, err)
		return
	}
	ni, sent, preexisting, err := u.nars.uploadNAR(n.ctx, n.info)
	if err != nil {
		u.graph.fail(n, fmt.Errorf("upload %s: %w", n.info.Path, err))
		return
	}
	u.graph.narUploaded(n, ni, sent, preexisting)
}

// runNarinfo is the last task of a node: its narinfo (and what follows it),
// once its NAR is up and its references' narinfos are written.
func (u *Uploader) runNarinfo(n *node) {
	ctx := n.ctx
	fail := func(err error) { u.graph.fail(n, fmt.Errorf("upload %s: %w", n.info.Path, err)) }
	if err := ctx.Err(); err != nil {
		fail(err)
		return
	}
	res, err := u.pub.publish(ctx, n)
	if err != nil {
		fail(err)
		return
	}
	n.owner.add(func(r *Result) {
		if res.wrote {
			r.Paths++
		} else {
			r.Kept++
		}
		r.NARBytes += n.ni.NarSize
		r.FileBytes += n.sent
		r.Realisations += res.extras
	})
	if res.wrote {
		u.log.Info("path uploaded", "path", n.info.Path, "nar_bytes", n.ni.NarSize, "file_bytes", n.ni.FileSize)
	} else {
		u.log.Info("narinfo already in the cache (another writer); kept it", "path", n.info.Path)
	}
	u.graph.succeed(n, res.started, time.Now(), res.wrote)
}

// ConfirmGeneration returns once the cache's generation was confirmed by a
// question sent at or after since (joining one in flight), so that what
// CheckPresence then answers from memory holds for the cache as it is now:
// a reset found by that question forgets what the emptied cache held.
func (u *Uploader) ConfirmGeneration(ctx context.Context, since time.Time) error {
	return u.gen.confirmAfter(ctx, since)
}

// CheckPresence asks the cache which of paths have a narinfo and returns
// the ones that do not. Paths known to be present cost nothing.
func (u *Uploader) CheckPresence(ctx context.Context, paths []string) ([]string, error) {
	return u.presence.check(ctx, paths)
}

// Prefetch learns which of paths the cache holds, in bulk (listings where
// that is cheaper), in the background. The paths count as being asked
// about when it returns, so that the jobs for them, which ask about their
// own path first, wait for this answer instead of asking again: call it
// before queueing them. Errors are only logged: the jobs then ask again.
func (u *Uploader) Prefetch(ctx context.Context, paths []string) {
	u.presence.prefetch(ctx, paths, func() error { return u.ensureFresh(ctx) })
}

// Forget drops what is known about the cache's contents (after an
// operator emptied the bucket, for example).
func (u *Uploader) Forget() error {
	return u.presence.reset()
}

// ForgetPaths drops paths (store paths) from the presence cache, in memory
// and across restarts: a collector announced their narinfos for deletion,
// so "the cache has it" may soon be false. Uploads that need them check
// the cache again. A remembered entry is forgotten on disk by dating it at
// the Unix epoch, which is older than any TTL, so it is never loaded again.
func (u *Uploader) ForgetPaths(paths []string) {
	// Their realisations are doomed with them: write them again when asked.
	u.pub.forgetRealisations()
	// Every path is forgotten, not only those known now: the records on
	// disk may not be loaded yet (the bucket was unreachable at start),
	// and an answer may be on its way.
	u.presence.forgetPersisted(paths)
}

// PutRealisations writes the realisations of info.Path, which is already
// in the cache (its narinfo and its closure's): for a job whose path was
// found present, so that derivations that produced it later (or that the
// agent learnt about after the narinfo was written) still get theirs.
func (u *Uploader) PutRealisations(ctx context.Context, info *nixstore.PathInfo) (int, error) {
	return u.pub.putRealisations(ctx, info)
}

// Maintain prunes what grows with uptime: presence entries older than the
// TTL (in memory and persisted) and the record of uploaded build logs.
func (u *Uploader) Maintain() {
	n := u.presence.prune()
	m, err := u.presence.pruneRecords()
	if err != nil {
		u.log.Warn("prune presence records", "err", err)
	}
	n += m
	u.pub.pruneLogs()
	if n > 0 {
		u.log.Debug("pruned presence cache", "entries", n)
	}
}

// Stats describe the uploader's state for status and doctor.
type Stats struct {
	KnownPresent      int
	Generation        string
	GenerationAge     time.Duration
	ConditionalWrites string // "yes", "no" or "unknown"
	PathsInProgress   int
	// DeterministicCompression: compressing a NAR twice gives the same
	// bytes: "yes", "no" or "unknown" (checked at start).
	DeterministicCompression string
}

// Stats returns the uploader's state.
func (u *Uploader) Stats() Stats {
	s := Stats{KnownPresent: u.presence.count(), GenerationAge: u.gen.age(), PathsInProgress: u.graph.inProgress(), DeterministicCompression: tristate(u.deterministic.Load())}
	s.Generation = u.gen.currentName()
	s.ConditionalWrites = tristate(u.pub.conditional.Load())
	return s
}

func tristate(v int32) string {
	switch v {
	case condYes:
		return "yes"
	case condNo:
		return "no"
	default:
		return "unknown"
	}
}

// checkDeterministic runs the compression self-check (see Stats).
func (u *Uploader) checkDeterministic() {
	ok, err := u.nars.comp.deterministic()
	switch {
	case err != nil:
		u.log.Warn("compression self-check", "err", err)
	case ok:
		u.deterministic.Store(condYes)
	default:
		u.deterministic.Store(condNo)
		u.log.Warn("compression does not give the same bytes for the same NAR here: a NAR put back after a cache reset may not match a narinfo written across the reset; the audit names such narinfos", "compression", u.opt.Cache.Compression)
	}
}

// PermanentError marks an error that retrying cannot fix.
type PermanentError struct{ Err error }

func (e *PermanentError) Error() string { return e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

// Permanent marks err as permanent.
func Permanent(err error) error { return &PermanentError{Err: err} }

// IsPermanent reports whether err (from Upload) cannot be fixed by retrying:
// the path is gone from the store, its contents do not match, or the bucket
// refuses (access denied, no such bucket, bad credentials).
func IsPermanent(err error) bool {
	var pe *PermanentError
	return errors.As(err, &pe) || bucket.IsPermanent(err)
}

// KnownPresent reports whether the cache is known to hold p's narinfo (and
// no collector announced it): queueing p would only find it there.
func (u *Uploader) KnownPresent(p string) bool { return u.presence.has(p) }
