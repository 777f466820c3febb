// Package uploader turns store paths into binary cache objects that stock Nix
// accepts: for a path P it walks P's closure, finds which paths the cache
// lacks, streams each missing path's NAR through hashing and compression,
// uploads the NAR, and writes the signed narinfo last.
//
// Invariants it keeps (design.md §4):
//   - a narinfo is written only after its NAR is complete and after the
//     narinfos of all its references exist in the cache;
//   - a NAR whose streamed hash differs from the store's NarHash is never
//     uploaded (a permanent error naming both hashes);
//   - memory does not grow with NAR size: the compressed NAR goes to a temp
//     file (which also gives FileHash and FileSize before the upload, and a
//     seekable body the S3 client can retry and send in parallel parts).
package uploader

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"golang.org/x/sync/singleflight"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/nar"
	"github.com/nixspool/nixspool/nixstore"
	"github.com/nixspool/nixspool/storepath"
)

// MetadataSource gives the closure of a path with each path's metadata,
// ordered dependencies first (nixstore.Store implements it).
type MetadataSource interface {
	Closure(ctx context.Context, path string) ([]*nixstore.PathInfo, error)
}

// Options configure an Uploader.
type Options struct {
	Bucket  bucket.Bucket
	Cache   *cacheurl.Cache
	Store   MetadataSource
	Keys    []signature.SecretKey
	TempDir string // for compressed NARs before upload; emptied by New
	// Streams bounds how many large (≥ 1 MiB) NARs are compressed at once;
	// each already uses two cores (default 2).
	Streams int
	Logger  *slog.Logger
	// Skip, if set, reports paths that count as present without being
	// uploaded (filters); it is consulted for every path of a closure.
	Skip func(*nixstore.PathInfo) bool
	// Presence, if set, keeps the presence cache across restarts.
	Presence PresenceStore
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
	// Guard, if set, is asked before every narinfo write whether the
	// objects it relies on are about to be deleted by a garbage collector
	// (see guard.go). Nil: no collector coordination.
	Guard Guard
}

// PresenceStore remembers, per cache identity (endpoint, bucket and
// prefix), which paths the cache holds, so a restart does not have to ask
// again. Records older than PresenceTTL are not trusted.
type PresenceStore interface {
	AddPresent(identity string, paths []string, now time.Time)
	Present(identity string, notBefore time.Time) ([]string, error)
	ForgetPresent(identity string) error
}

// PresenceTTL is how long a remembered "the cache has it" is trusted.
const PresenceTTL = 7 * 24 * time.Hour

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
	opt      Options
	comp     *narCompressor
	sf       singleflight.Group
	narSlots chan struct{}
	headSlot chan struct{}
	present  sync.Map // store path → struct{}: known to have a narinfo in this cache
	// cacheInfoOK: nix-cache-info is known to exist. No narinfo is written
	// before it: without it Nix refuses the whole cache.
	cacheInfoOK atomic.Bool
	logsDone    sync.Map // drv base name → true: build log uploaded (or being)
	progress    sync.Map // store path → *Progress
	log         *slog.Logger
}

// Progress is one NAR being streamed.
type Progress struct {
	Path  string
	Total int64
	done  atomic.Int64
}

// Done is the number of NAR bytes processed so far.
func (p *Progress) Done() int64 { return p.done.Load() }

// Result sums what one Upload call uploaded.
type Result struct {
	Paths     int
	NARBytes  uint64
	FileBytes uint64
	Skipped   int // paths of the closure left out by Options.Skip
}

// New returns an Uploader and removes temp files an earlier run left.
func New(opt Options) (*Uploader, error) {
	if opt.Streams <= 0 {
		opt.Streams = 2
	}
	if opt.ResumeAbove <= 0 {
		opt.ResumeAbove = 64 << 20
	}
	if opt.LogDir == "" {
		opt.LogDir = DefaultLogDir
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	comp, err := newNARCompressor(opt.Cache.Compression, opt.Cache.CompressionLevel)
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
		opt:      opt,
		comp:     comp,
		narSlots: make(chan struct{}, opt.Streams),
		headSlot: make(chan struct{}, 16),
		log:      opt.Logger,
	}
	if opt.Presence != nil {
		known, err := opt.Presence.Present(opt.Cache.Identity(), time.Now().Add(-PresenceTTL))
		if err != nil {
			return nil, fmt.Errorf("load presence cache: %w", err)
		}
		for _, p := range known {
			u.present.Store(p, struct{}{})
		}
		if len(known) > 0 {
			opt.Logger.Info("presence cache loaded", "cache", opt.Cache.String(), "paths", len(known))
		}
	}
	return u, nil
}

// InProgress returns the NARs being streamed now.
func (u *Uploader) InProgress() []*Progress {
	var out []*Progress
	u.progress.Range(func(_, v any) bool {
		out = append(out, v.(*Progress))
		return true
	})
	return out
}

// EnsureCacheInfo writes nix-cache-info at the cache root if it is missing.
// Once it has succeeded it costs nothing.
func (u *Uploader) EnsureCacheInfo(ctx context.Context) error {
	if u.cacheInfoOK.Load() {
		return nil
	}
	_, err := u.opt.Bucket.Stat(ctx, "nix-cache-info")
	if err == nil {
		u.cacheInfoOK.Store(true)
		return nil
	}
	if !bucket.IsNotExist(err) {
		return fmt.Errorf("check nix-cache-info: %w", err)
	}
	wmq := 0
	if u.opt.Cache.WantMassQuery {
		wmq = 1
	}
	body := fmt.Sprintf("StoreDir: %s\nWantMassQuery: %d\nPriority: %d\n", storepath.DefaultStoreDir, wmq, u.opt.Cache.Priority)
	if _, err := u.opt.Bucket.Put(ctx, "nix-cache-info", strings.NewReader(body), int64(len(body)), bucket.PutOptions{ContentType: "text/x-nix-cache-info"}); err != nil {
		return fmt.Errorf("write nix-cache-info: %w", err)
	}
	u.cacheInfoOK.Store(true)
	return nil
}

// Probe asks the cache for nix-cache-info (writing it if missing): a real
// round trip, to learn whether the bucket is back after an outage.
func (u *Uploader) Probe(ctx context.Context) error {
	u.cacheInfoOK.Store(false)
	return u.EnsureCacheInfo(ctx)
}

// Upload makes path and its whole closure available in the cache.
func (u *Uploader) Upload(ctx context.Context, path string) (Result, error) {
	if _, ok := u.present.Load(path); ok {
		if !u.doomed(path) {
			return Result{}, nil
		}
		u.present.Delete(path) // announced for deletion: revive or upload it again
	}
	if err := u.EnsureCacheInfo(ctx); err != nil {
		return Result{}, err
	}
	closure, err := u.opt.Store.Closure(ctx, path)
	if err != nil {
		var inv *nixstore.InvalidPathError
		if !errors.As(err, &inv) {
			return Result{}, err
		}
		// Gone from the store. If it reached the cache before (an
		// acknowledgement lost in a crash), the job is done after all.
		if have, herr := u.presentTop(ctx, path); herr == nil && have {
			u.markPresent(path)
			return Result{}, nil
		} else if herr != nil && u.doomed(path) {
			return Result{}, herr // a collector holds it back: transient
		}
		return Result{}, Permanent(err)
	}
	top := closure[len(closure)-1]
	// The top path first: if it is there, its closure is too. A small
	// NAR is simply uploaded (the PUT is idempotent and costs about what
	// the HEAD would); a large one is worth the HEAD.
	if top.NarSize >= smallNAR {
		if have, err := u.presentTop(ctx, path); err != nil || have {
			if have {
				u.markPresent(path)
			}
			return Result{}, err
		}
	}
	infos := make(map[string]*nixstore.PathInfo, len(closure))
	var deps []string
	for _, info := range closure {
		infos[info.Path] = info
		if info.Path != path {
			deps = append(deps, info.Path)
		}
	}
	if _, err := u.CheckPresence(ctx, deps); err != nil {
		return Result{}, err
	}
	var res Result
	var mu sync.Mutex
	err = u.ensure(ctx, infos, path, &res, &mu)
	return res, err
}

// ensure makes p present in the cache, uploading its references first. It
// is shared (singleflight) between concurrent callers for the same path.
func (u *Uploader) ensure(ctx context.Context, infos map[string]*nixstore.PathInfo, p string, res *Result, mu *sync.Mutex) error {
	if _, ok := u.present.Load(p); ok {
		return nil
	}
	_, err, _ := u.sf.Do(p, func() (any, error) {
		// Another job may have finished p between the check above and
		// this call; singleflight only merges calls that overlap.
		if _, ok := u.present.Load(p); ok {
			return nil, nil
		}
		return nil, u.ensureOnce(ctx, infos, p, res, mu)
	})
	return err
}

func (u *Uploader) ensureOnce(ctx context.Context, infos map[string]*nixstore.PathInfo, p string, res *Result, mu *sync.Mutex) error {
	info := infos[p]
	if info == nil {
		return fmt.Errorf("%s: not in the closure", p)
	}
	if u.opt.Skip != nil && u.opt.Skip(info) {
		// A filtered path counts as present: clients get it elsewhere
		// (e.g. from the upstream cache that signed it).
		u.present.Store(p, struct{}{})
		mu.Lock()
		res.Skipped++
		mu.Unlock()
		return nil
	}
	// Upload checked the whole closure's presence before calling ensure:
	// a path that is not known present here is missing.
	// References in parallel with this path's own NAR upload; its narinfo
	// waits for both.
	var wg sync.WaitGroup
	var depErr error
	var depMu sync.Mutex
	for _, r := range info.References {
		if r == p {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := u.ensure(ctx, infos, r, res, mu); err != nil {
				depMu.Lock()
				if depErr == nil {
					depErr = fmt.Errorf("dependency %s: %w", r, err)
				}
				depMu.Unlock()
			}
		}()
	}
	ni, up, narErr := u.uploadNAR(ctx, info)
	wg.Wait()
	if narErr != nil {
		return narErr
	}
	if depErr != nil {
		return depErr
	}
	if err := u.guardNarinfo(ctx, ni.StorePath, ni.URL, ni.References); err != nil {
		return err
	}
	if err := u.putNarinfo(ctx, ni); err != nil {
		return err
	}
	u.markPresent(p)
	if u.opt.UploadLogs && info.Deriver != "" {
		u.uploadLog(ctx, info.Deriver)
	}
	mu.Lock()
	res.Paths++
	res.NARBytes += ni.NarSize
	res.FileBytes += up
	mu.Unlock()
	u.log.Info("path uploaded", "path", p, "nar_bytes", ni.NarSize, "file_bytes", ni.FileSize)
	return nil
}

func (u *Uploader) hasNarinfo(ctx context.Context, p string) (bool, error) {
	select {
	case u.headSlot <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	defer func() { <-u.headSlot }()
	_, err := u.opt.Bucket.Stat(ctx, storepath.HashPart(p)+".narinfo")
	switch {
	case err == nil:
		return true, nil
	case bucket.IsNotExist(err):
		return false, nil
	default:
		return false, err
	}
}

// HashMismatchError means the store's contents no longer match its record.
type HashMismatchError struct {
	Path            string
	Want, Got       string
	WantSize, GotSz uint64
}

func (e *HashMismatchError) Error() string {
	return fmt.Sprintf("NAR of %s does not match the store's record: store says %s (%d bytes), contents hash to %s (%d bytes); upload aborted", e.Path, e.Want, e.WantSize, e.Got, e.GotSz)
}

// smallNAR is the size below which a NAR is compressed in memory and
// uploaded without a HEAD first: for tiny paths the per-path cost is
// round trips and syscalls, not bytes (perf.md §8).
const smallNAR = 1 << 20

// uploadNAR streams p's NAR through hashing and compression (to memory for
// small NARs, to a temp file otherwise), checks the NAR hash against the
// store's, uploads the compressed file under its content hash, and returns
// the narinfo to write and the number of bytes sent.
func (u *Uploader) uploadNAR(ctx context.Context, info *nixstore.PathInfo) (*narinfo.NarInfo, uint64, error) {
	small := info.NarSize < smallNAR
	if !small {
		// Large NARs are CPU-bound (compression); limit how many run at once.
		select {
		case u.narSlots <- struct{}{}:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
		defer func() { <-u.narSlots }()
	}
	// Shown by agentctl status/watch for the whole upload, not only while
	// the NAR is being read.
	u.progress.Store(info.Path, &Progress{Path: info.Path, Total: int64(info.NarSize)})
	defer u.progress.Delete(info.Path)
	if mp, ok := u.opt.Bucket.(bucket.Multipart); ok && u.opt.Resume != nil && info.NarSize >= uint64(u.opt.ResumeAbove) {
		return u.uploadResumable(ctx, info, mp)
	}

	var sink interface {
		io.Writer
		io.ReadSeeker
	}
	if small {
		sink = &memFile{}
	} else {
		tmp, err := os.CreateTemp(u.opt.TempDir, "nar-*.tmp")
		if err != nil {
			return nil, 0, fmt.Errorf("temp file: %w", err)
		}
		defer func() {
			tmp.Close()
			os.Remove(tmp.Name())
		}()
		sink = tmp
	}
	fileSum, size, listing, err := u.compressNAR(ctx, info, sink, small)
	if err != nil {
		return nil, 0, err
	}
	key := u.narKey(fileSum)
	sent := uint64(0)
	exists := false
	if !small {
		// Worth a HEAD: skipping a large upload that is already there
		// (same content, same key) saves far more than the round trip.
		exists = u.objectExists(ctx, key, size)
	}
	if !exists {
		if _, err := sink.Seek(0, io.SeekStart); err != nil {
			return nil, 0, err
		}
		if _, err := u.opt.Bucket.Put(ctx, key, sink, size, bucket.PutOptions{ContentType: "application/x-nix-nar"}); err != nil {
			return nil, 0, err
		}
		sent = uint64(size)
	}
	return u.finishNAR(ctx, info, key, fileSum, size, listing, sent)
}

func (u *Uploader) narKey(fileSum []byte) string {
	return "nar/" + nixbase32.EncodeToString(fileSum) + ".nar" + u.comp.ext
}

func (u *Uploader) objectExists(ctx context.Context, key string, size int64) bool {
	st, err := u.opt.Bucket.Stat(ctx, key)
	return err == nil && st.Size == size
}

// finishNAR uploads the listing (if any) and builds the narinfo.
func (u *Uploader) finishNAR(ctx context.Context, info *nixstore.PathInfo, key string, fileSum []byte, size int64, listing *nar.Listing, sent uint64) (*narinfo.NarInfo, uint64, error) {
	if listing != nil {
		if err := u.putListing(ctx, info.Path, listing); err != nil {
			return nil, 0, err
		}
	}
	ni, err := u.makeNarinfo(info, key, fileSum, uint64(size))
	if err != nil {
		return nil, 0, err
	}
	return ni, sent, nil
}

// compressNAR writes the compressed NAR of info.Path to sink and returns
// the compressed file's SHA-256 and size, and the listing if one is wanted.
// A NAR whose hash or size differs from the store's record is a permanent
// error, and nothing of it may be uploaded.
func (u *Uploader) compressNAR(ctx context.Context, info *nixstore.PathInfo, sink io.Writer, small bool) ([]byte, int64, *nar.Listing, error) {
	prog := u.trackProgress(info)

	narHash, fileHash := sha256.New(), sha256.New()
	fileCount := &countWriter{w: io.MultiWriter(sink, fileHash)}
	cw, err := u.comp.wrap(fileCount, small)
	if err != nil {
		return nil, 0, nil, err
	}
	narSink := &ctxWriter{ctx: ctx, w: io.MultiWriter(narHash, cw), prog: prog}
	narSize, listing, err := nar.Dump(narSink, info.Path, u.opt.Cache.WriteNARListing)
	if cerr := cw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, nil, ctx.Err()
		}
		if _, serr := os.Lstat(info.Path); errors.Is(serr, os.ErrNotExist) {
			return nil, 0, nil, Permanent(fmt.Errorf("%s was deleted from the store (garbage-collected?): %w", info.Path, err))
		}
		return nil, 0, nil, fmt.Errorf("stream NAR of %s: %w", info.Path, err)
	}
	gotHash := narHash.Sum(nil)
	if !bytes.Equal(gotHash, info.NarHash) || uint64(narSize) != info.NarSize {
		return nil, 0, nil, Permanent(&HashMismatchError{
			Path: info.Path, Want: "sha256:" + nixbase32.EncodeToString(info.NarHash), WantSize: info.NarSize,
			Got: "sha256:" + nixbase32.EncodeToString(gotHash), GotSz: uint64(narSize),
		})
	}
	return fileHash.Sum(nil), fileCount.n, listing, nil
}

// trackProgress returns the progress entry of info's upload.
func (u *Uploader) trackProgress(info *nixstore.PathInfo) *Progress {
	if v, ok := u.progress.Load(info.Path); ok {
		return v.(*Progress)
	}
	return &Progress{Path: info.Path, Total: int64(info.NarSize)}
}

// memFile is an in-memory file for small compressed NARs.
type memFile struct {
	buf bytes.Buffer
	r   *bytes.Reader
}

func (m *memFile) Write(p []byte) (int, error) { return m.buf.Write(p) }
func (m *memFile) Read(p []byte) (int, error) {
	if m.r == nil {
		m.r = bytes.NewReader(m.buf.Bytes())
	}
	return m.r.Read(p)
}
func (m *memFile) Seek(off int64, whence int) (int64, error) {
	m.r = bytes.NewReader(m.buf.Bytes())
	return m.r.Seek(off, whence)
}

func (u *Uploader) putListing(ctx context.Context, p string, listing *nar.Listing) error {
	js, err := json.Marshal(listing)
	if err != nil {
		return err
	}
	body, err := compressMeta(u.opt.Cache.LsCompression, js)
	if err != nil {
		return err
	}
	_, err = u.opt.Bucket.Put(ctx, storepath.HashPart(p)+".ls", bytes.NewReader(body), int64(len(body)),
		bucket.PutOptions{ContentType: "application/json", ContentEncoding: u.opt.Cache.LsCompression})
	return err
}

// makeNarinfo builds the narinfo: Nix's field order (go-nix renders it),
// references sorted as base names, our signatures plus the ones the path
// already carries from other keys.
func (u *Uploader) makeNarinfo(info *nixstore.PathInfo, url string, fileSum []byte, fileSize uint64) (*narinfo.NarInfo, error) {
	comp := u.opt.Cache.Compression
	ni := &narinfo.NarInfo{
		StorePath:   info.Path,
		URL:         url,
		Compression: comp,
		FileHash:    nixhash.MustNewHashWithEncoding(nixhash.SHA256, fileSum, nixhash.NixBase32, true),
		FileSize:    fileSize,
		NarHash:     nixhash.MustNewHashWithEncoding(nixhash.SHA256, info.NarHash, nixhash.NixBase32, true),
		NarSize:     info.NarSize,
		CA:          info.CA,
	}
	for _, r := range info.References { // already sorted; base names sort the same
		ni.References = append(ni.References, filepath.Base(r))
	}
	if info.Deriver != "" {
		ni.Deriver = filepath.Base(info.Deriver)
	}
	fp := ni.Fingerprint()
	ours := map[string]bool{}
	for _, k := range u.opt.Keys {
		sig, err := k.Sign(nil, fp)
		if err != nil {
			return nil, fmt.Errorf("sign %s: %w", info.Path, err)
		}
		ni.Signatures = append(ni.Signatures, sig)
		ours[sig.Name] = true
	}
	for _, s := range info.Sigs {
		sig, err := signature.ParseSignature(s)
		if err != nil || ours[sig.Name] {
			continue
		}
		ni.Signatures = append(ni.Signatures, sig)
	}
	return ni, nil
}

func (u *Uploader) putNarinfo(ctx context.Context, ni *narinfo.NarInfo) error {
	body, err := compressMeta(u.opt.Cache.NarinfoCompression, []byte(ni.String()))
	if err != nil {
		return err
	}
	_, err = u.opt.Bucket.Put(ctx, storepath.HashPart(ni.StorePath)+".narinfo", bytes.NewReader(body), int64(len(body)),
		bucket.PutOptions{ContentType: "text/x-nix-narinfo", ContentEncoding: u.opt.Cache.NarinfoCompression})
	return err
}

// markPresent remembers that p has a narinfo in the cache, in memory and,
// with a PresenceStore, across restarts.
func (u *Uploader) markPresent(p string) {
	u.present.Store(p, struct{}{})
	u.persistPresent([]string{p})
}

func (u *Uploader) persistPresent(paths []string) {
	if u.opt.Presence != nil && len(paths) > 0 {
		u.opt.Presence.AddPresent(u.opt.Cache.Identity(), paths, time.Now())
	}
}

// Forget drops what is known about the cache's contents (after an
// operator emptied the bucket, for example).
func (u *Uploader) Forget() error {
	u.present.Clear()
	if u.opt.Presence != nil {
		return u.opt.Presence.ForgetPresent(u.opt.Cache.Identity())
	}
	return nil
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

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// ctxWriter stops a NAR stream when ctx is cancelled and reports progress.
type ctxWriter struct {
	ctx  context.Context
	w    io.Writer
	prog *Progress
}

func (c *ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := c.w.Write(p)
	c.prog.done.Add(int64(n))
	return n, err
}

// CheckPresence asks the cache which of paths already have a narinfo, with
// up to 16 HEAD requests in flight over kept-alive connections, remembers
// the ones that do, and returns the ones that do not. Paths already known to
// be present cost nothing.
func (u *Uploader) CheckPresence(ctx context.Context, paths []string) (missing []string, err error) {
	var found []string
	defer func() { u.persistPresent(found) }()
	todo := make(chan string)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < cap(u.headSlot); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range todo {
				have, herr := u.hasNarinfo(ctx, p)
				mu.Lock()
				switch {
				case herr != nil:
					if err == nil {
						err = herr
					}
				case have:
					u.present.Store(p, struct{}{})
					found = append(found, p)
				default:
					missing = append(missing, p)
				}
				mu.Unlock()
			}
		}()
	}
	for _, p := range paths {
		if _, ok := u.present.Load(p); !ok {
			todo <- p
		}
	}
	close(todo)
	wg.Wait()
	return missing, err
}
