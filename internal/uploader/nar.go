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
	"sync"
	"sync/atomic"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"golang.org/x/sync/semaphore"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/nar"
	"github.com/nixspool/nixspool/nixsig"
)

// smallNAR is the size below which a NAR is compressed in memory and
// uploaded without a HEAD first: for tiny paths the per-path cost is round
// trips and syscalls, not bytes. Overwriting a NAR object with
// the same content is harmless: its key is the hash of its content.
const smallNAR = 1 << 20

// smallOverhead is what one in-memory NAR costs beyond its size
// (incompressible input grows a little; buffers round up).
const smallOverhead = 64 << 10

// HashMismatchError means the store's contents no longer match its record.
type HashMismatchError struct {
	Path            string
	Want, Got       string
	WantSize, GotSz uint64
}

func (e *HashMismatchError) Error() string {
	return fmt.Sprintf("NAR of %s does not match the store's record: store says %s (%d bytes), contents hash to %s (%d bytes); upload aborted", e.Path, e.Want, e.WantSize, e.Got, e.GotSz)
}

// GrownError means a store path's contents are larger than the store's
// record says: the NAR was cut off as soon as it passed the recorded
// size, so no more than that is ever read, held in memory or written to a
// temp file.
type GrownError struct {
	Path     string
	WantSize uint64 // the store's NarSize
	Read     uint64 // NAR bytes produced when the stream was stopped
}

func (e *GrownError) Error() string {
	return fmt.Sprintf("NAR of %s is larger than the store's record: store says %d bytes, contents had given %d bytes when reading stopped; upload aborted", e.Path, e.WantSize, e.Read)
}

// narTransfer moves NARs into the cache: it streams a path's NAR through
// hashing and compression (small ones in memory within a byte budget,
// large ones into a temp file, a few at a time), uploads it under its
// content hash, resumably as a multipart upload above resumeAbove
// (resume.go), and builds the signed narinfo that names it. Writing that
// narinfo is not its job.
type narTransfer struct {
	bucket      bucket.Bucket
	cache       *cacheurl.Cache
	keys        []signature.SecretKey
	guard       Guard       // nil without a collector
	resume      ResumeStore // nil: no resumable uploads
	resumeAbove int64
	tempDir     string
	comp        *narCompressor
	// compressSlots bounds small NARs compressing, largeCompress large
	// ones; smallBudget the bytes of small NARs held in memory.
	compressSlots chan struct{}
	largeCompress chan struct{}
	smallBudget   *semaphore.Weighted
	progress      sync.Map   // store path → *Progress
	resuming      resumeWork // resumable uploads running (resume.go)
	log           *slog.Logger
}

func newNARTransfer(opt Options, comp *narCompressor) *narTransfer {
	return &narTransfer{bucket: opt.Bucket, cache: opt.Cache, keys: opt.Keys, guard: opt.Guard, resume: opt.Resume,
		resumeAbove: opt.ResumeAbove, tempDir: opt.TempDir, comp: comp,
		compressSlots: make(chan struct{}, 4), largeCompress: make(chan struct{}, opt.Streams),
		smallBudget: semaphore.NewWeighted(opt.SmallBudget), log: opt.Logger}
}

// uploadNAR streams info's NAR through hashing and compression (to memory
// for small NARs, to a temp file otherwise), checks the NAR hash against the
// store's, uploads the compressed file under its content hash, and returns
// the narinfo to write, the bytes sent and the keys of preexisting objects
// the narinfo depends on (the NAR, if an identical one was already there).
func (t *narTransfer) uploadNAR(ctx context.Context, info *nixstore.PathInfo) (*narinfo.NarInfo, uint64, []string, error) {
	// Shown by agentctl status/watch for the whole upload, not only while
	// the NAR is being read.
	t.progress.Store(info.Path, &Progress{Path: info.Path, Total: int64(info.NarSize)})
	defer t.progress.Delete(info.Path)
	if !t.isLarge(info) {
		return t.uploadSmallNAR(ctx, info)
	}
	// Large NARs keep a temp file and run on the large-NAR workers (4 per
	// compression stream): their number bounds the temp files, and only
	// Streams of them compress at once.
	if mp, ok := t.resumable(info); ok {
		ni, sent, err := t.uploadResumable(ctx, info, mp)
		if err != nil {
			return nil, 0, nil, err
		}
		var preexisting []string
		if sent == 0 {
			preexisting = []string{ni.URL}
		}
		return ni, sent, preexisting, nil
	}
	tmp, err := os.CreateTemp(t.tempDir, "nar-*.tmp")
	if err != nil {
		return nil, 0, nil, fmt.Errorf("temp file: %w: %w", bucket.ErrLocal, err)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	fileSum, size, listing, err := t.compressLarge(ctx, info, tmp)
	if err != nil {
		return nil, 0, nil, err
	}
	key := t.narKey(fileSum)
	// Worth a HEAD: skipping a large upload that is already there (same
	// content, same key) saves far more than the round trip. The narinfo
	// then relies on that existing object.
	if t.objectExists(ctx, key, size) {
		ni, _, err := t.finishNAR(ctx, info, key, t.comp.method, fileSum, size, listing, 0)
		return ni, 0, []string{key}, err
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return nil, 0, nil, fmt.Errorf("%w: %w", bucket.ErrLocal, err)
	}
	if _, err := t.bucket.Put(ctx, key, tmp, size, bucket.PutOptions{ContentType: "application/x-nix-nar", SHA256: fileSum}); err != nil {
		return nil, 0, nil, err
	}
	ni, sent, err := t.finishNAR(ctx, info, key, t.comp.method, fileSum, size, listing, uint64(size))
	return ni, sent, nil, err
}

// compressLarge compresses a large NAR into file, a few at a time (each
// compressor uses both cores and keeps a window in memory); the upload that
// follows needs no slot, so distant buckets get several large uploads in
// flight while the cores compress the next ones.
func (t *narTransfer) compressLarge(ctx context.Context, info *nixstore.PathInfo, file io.Writer) ([]byte, int64, *nar.Listing, error) {
	select {
	case t.largeCompress <- struct{}{}:
	case <-ctx.Done():
		return nil, 0, nil, ctx.Err()
	}
	defer func() { <-t.largeCompress }()
	return t.compressNAR(ctx, info, file, false)
}

// uploadSmallNAR compresses a small NAR into memory and uploads it. Memory
// is bounded by design: every in-memory NAR holds its size (plus overhead)
// of a fixed byte budget while it exists, and only a few are compressed at
// once (each compressor keeps a window).
func (t *narTransfer) uploadSmallNAR(ctx context.Context, info *nixstore.PathInfo) (*narinfo.NarInfo, uint64, []string, error) {
	need := int64(info.NarSize) + smallOverhead
	if err := t.smallBudget.Acquire(ctx, need); err != nil {
		return nil, 0, nil, err
	}
	defer t.smallBudget.Release(need)
	select {
	case t.compressSlots <- struct{}{}:
	case <-ctx.Done():
		return nil, 0, nil, ctx.Err()
	}
	buf := &memFile{}
	buf.buf.Grow(int(info.NarSize/2) + 512)
	fileSum, size, listing, err := t.compressNAR(ctx, info, buf, true)
	<-t.compressSlots
	if err != nil {
		return nil, 0, nil, err
	}
	key := t.narKey(fileSum)
	if _, err := t.bucket.Put(ctx, key, buf, size, bucket.PutOptions{ContentType: "application/x-nix-nar", SHA256: fileSum}); err != nil {
		return nil, 0, nil, err
	}
	ni, sent, err := t.finishNAR(ctx, info, key, t.comp.method, fileSum, size, listing, uint64(size))
	return ni, sent, nil, err
}

// isLarge reports whether info's NAR goes through a temp file (large, or
// resumable) rather than memory.
func (t *narTransfer) isLarge(info *nixstore.PathInfo) bool {
	_, resumable := t.resumable(info)
	return info.NarSize >= smallNAR || resumable
}

// resumable returns the multipart bucket if info's upload is resumable.
func (t *narTransfer) resumable(info *nixstore.PathInfo) (bucket.Multipart, bool) {
	mp, ok := t.bucket.(bucket.Multipart)
	return mp, ok && t.resume != nil && info.NarSize >= uint64(t.resumeAbove)
}

func (t *narTransfer) narKey(fileSum []byte) string {
	return cachefmt.Keys.NAR(nixbase32.EncodeToString(fileSum), t.comp.ext)
}

func (t *narTransfer) objectExists(ctx context.Context, key string, size int64) bool {
	st, err := t.bucket.Stat(ctx, key)
	if err != nil || st.Size != size {
		return false
	}
	// An object a collector announced for deletion is not trusted either.
	return t.guard == nil || !t.guard.Doomed(key)
}

// finishNAR uploads the listing (if any) and builds the narinfo of the NAR
// file uploaded at key, compressed with compression.
func (t *narTransfer) finishNAR(ctx context.Context, info *nixstore.PathInfo, key, compression string, fileSum []byte, size int64, listing *nar.Listing, sent uint64) (*narinfo.NarInfo, uint64, error) {
	if listing != nil {
		if err := t.putListing(ctx, info.Path, listing); err != nil {
			return nil, 0, err
		}
	}
	ni, err := t.makeNarinfo(info, key, compression, fileSum, uint64(size))
	if err != nil {
		return nil, 0, err
	}
	return ni, sent, nil
}

// compressNAR writes the compressed NAR of info.Path to sink and returns
// the compressed file's SHA-256 and size, and the listing if one is wanted.
// A NAR whose hash or size differs from the store's record is a permanent
// error, and nothing of it may be uploaded.
func (t *narTransfer) compressNAR(ctx context.Context, info *nixstore.PathInfo, sink io.Writer, small bool) ([]byte, int64, *nar.Listing, error) {
	prog := t.trackProgress(info)

	narHash, fileHash := sha256.New(), sha256.New()
	fileCount := &countWriter{w: io.MultiWriter(sink, fileHash)}
	cw, err := t.comp.wrap(fileCount, small)
	if err != nil {
		return nil, 0, nil, err
	}
	// The NAR is cut off one byte past the recorded size: a path that grew
	// after Nix registered it costs no more memory or temp disk than the
	// record allows, however large it is now.
	limited := &limitWriter{w: io.MultiWriter(narHash, cw), limit: info.NarSize}
	narSink := &ctxWriter{ctx: ctx, w: limited, prog: prog}
	narSize, listing, err := nar.Dump(narSink, info.Path, t.cache.WriteNARListing)
	if cerr := cw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, nil, ctx.Err()
		}
		if errors.Is(err, errNARTooLarge) {
			return nil, 0, nil, Permanent(&GrownError{Path: info.Path, WantSize: info.NarSize, Read: limited.n + limited.refused})
		}
		if _, serr := os.Lstat(info.Path); errors.Is(serr, os.ErrNotExist) {
			return nil, 0, nil, Permanent(fmt.Errorf("%s was deleted from the store (garbage-collected?): %w", info.Path, err))
		}
		return nil, 0, nil, fmt.Errorf("stream NAR of %s: %w: %w", info.Path, bucket.ErrLocal, err)
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

// Progress is one NAR being streamed.
type Progress struct {
	Path  string
	Total int64
	done  atomic.Int64
}

// Done is the number of NAR bytes processed so far.
func (p *Progress) Done() int64 { return p.done.Load() }

// trackProgress returns the progress entry of info's upload.
func (t *narTransfer) trackProgress(info *nixstore.PathInfo) *Progress {
	if v, ok := t.progress.Load(info.Path); ok {
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

func (t *narTransfer) putListing(ctx context.Context, p string, listing *nar.Listing) error {
	js, err := json.Marshal(listing)
	if err != nil {
		return err
	}
	body, err := compressMeta(t.cache.LsCompression, js)
	if err != nil {
		return err
	}
	_, err = t.bucket.Put(ctx, cachefmt.Keys.ListingOf(p), bytes.NewReader(body), int64(len(body)),
		bucket.PutOptions{ContentType: "application/json", ContentEncoding: t.cache.LsCompression})
	return err
}

// makeNarinfo builds the narinfo: Nix's field order (go-nix renders it),
// references sorted as base names, our signatures plus the ones the path
// already carries from other keys, in Nix's order (nixsig). url, compression, fileSum and fileSize
// describe the NAR file actually uploaded (a resumed upload's file may
// predate the cache's configuration).
func (t *narTransfer) makeNarinfo(info *nixstore.PathInfo, url, compression string, fileSum []byte, fileSize uint64) (*narinfo.NarInfo, error) {
	ni := &narinfo.NarInfo{
		StorePath:   info.Path,
		URL:         url,
		Compression: compression,
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
	sigs, err := nixsig.Merge(ni.Fingerprint(), t.keys, info.Sigs)
	if err != nil {
		return nil, fmt.Errorf("narinfo of %s: %w", info.Path, err)
	}
	ni.Signatures = sigs
	return ni, nil
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

// errNARTooLarge stops a NAR stream that passes its recorded size.
var errNARTooLarge = errors.New("NAR larger than recorded")

// limitWriter passes on at most limit bytes; a write that would go past it
// is refused whole (nothing of it is written) with errNARTooLarge.
type limitWriter struct {
	w       io.Writer
	limit   uint64
	n       uint64 // bytes passed on
	refused uint64 // bytes of the refused write
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if uint64(len(p)) > l.limit-l.n {
		l.refused = uint64(len(p))
		return 0, errNARTooLarge
	}
	n, err := l.w.Write(p)
	l.n += uint64(n)
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
