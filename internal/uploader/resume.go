package uploader

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"golang.org/x/sync/errgroup"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/nar"
	"github.com/nixspool/nixspool/storepath"
)

// resumeRecord is what survives a crash of a large upload: the compressed
// NAR stays in the temp dir, the multipart upload and its completed parts
// stay on the server, and this record (in the queue database) ties them to
// the store path.
//
// It also binds everything the narinfo is built from besides the path's
// metadata: the compression of the kept file and the NAR it holds (NarHash,
// NarSize). A record that does not match the cache's compression or the
// path's current NAR (the operator changed compression=; the path was
// collected and built again with other contents) is discarded and the
// upload starts over, so a narinfo never contradicts its NAR. Records
// written before these fields existed do not match either.
type resumeRecord struct {
	Key         string `json:"key"`
	UploadID    string `json:"upload_id"`
	File        string `json:"file"`
	FileSize    int64  `json:"file_size"`
	FileHash    string `json:"file_hash"` // nix32 SHA-256 of the compressed NAR
	PartSize    int64  `json:"part_size"`
	Compression string `json:"compression"`
	NarHash     string `json:"nar_hash"` // nix32 SHA-256 of the NAR the file holds
	NarSize     uint64 `json:"nar_size"`
	// Used is when an upload last started or resumed from the record
	// (zero in older records: the kept file's time stands in).
	Used time.Time `json:"used,omitzero"`
}

// staleResume is how long a resume record may go unused before
// RecoverUploads releases it: by then the jobs that wanted the path were
// dropped or failed, or will start over at the cost of one upload.
const staleResume = 7 * 24 * time.Hour

// mismatch says why rec cannot be resumed for info with the current
// configuration ("" if it can).
func (t *narTransfer) mismatch(rec *resumeRecord, info *nixstore.PathInfo) string {
	switch {
	case rec.Compression != t.comp.method:
		return fmt.Sprintf("kept NAR is compressed with %q, the cache wants %q", rec.Compression, t.comp.method)
	case rec.NarHash != nixbase32.EncodeToString(info.NarHash) || rec.NarSize != info.NarSize:
		return fmt.Sprintf("kept NAR is sha256:%s (%d bytes), the store path now has sha256:%s (%d bytes)",
			rec.NarHash, rec.NarSize, nixbase32.EncodeToString(info.NarHash), info.NarSize)
	}
	return ""
}

const partialSuffix = ".partial"

func (t *narTransfer) partialFile(storePath string) string {
	return filepath.Join(t.tempDir, "nar-"+storepath.HashPart(storePath)+partialSuffix)
}

// uploadResumable uploads a large NAR as a multipart upload that a later
// attempt (after a crash, a restart or a transient error) continues from
// the parts the server already holds, checked against their MD5 ETags.
func (t *narTransfer) uploadResumable(ctx context.Context, info *nixstore.PathInfo, mp bucket.Multipart) (*narinfo.NarInfo, uint64, error) {
	// One upload of a path at a time: a node replacing a cancelled one
	// waits for the old upload to wind down, so that the two never share
	// the record and the kept file (one could save the record again after
	// the other completed and deleted it).
	release, err := t.resuming.exclusive(ctx, info.Path)
	if err != nil {
		return nil, 0, err
	}
	defer release()
	rec, listing, err := t.resumeOrPrepare(ctx, info, mp)
	if err != nil || rec == nil {
		return nil, 0, err
	}
	fileSum, _ := nixbase32.DecodeString(rec.FileHash)
	if t.objectExists(ctx, rec.Key, rec.FileSize) {
		// The upload completed, but the record outlived it.
		t.discardRecord(ctx, info.Path, rec, mp, false)
		return t.finishNAR(ctx, info, rec.Key, rec.Compression, fileSum, rec.FileSize, listing, 0)
	}
	sent, err := t.sendParts(ctx, info.Path, rec, mp)
	if err != nil {
		if IsPermanent(err) {
			t.discardRecord(ctx, info.Path, rec, mp, true)
		}
		return nil, 0, err
	}
	t.discardRecord(ctx, info.Path, rec, mp, false)
	return t.finishNAR(ctx, info, rec.Key, rec.Compression, fileSum, rec.FileSize, listing, sent)
}

// resumeOrPrepare returns the resume record of info.Path, creating it (by
// compressing the NAR and starting a multipart upload) if there is no
// usable one. The listing is produced when the cache wants one.
func (t *narTransfer) resumeOrPrepare(ctx context.Context, info *nixstore.PathInfo, mp bucket.Multipart) (*resumeRecord, *nar.Listing, error) {
	if rec := t.loadRecord(info.Path); rec != nil {
		err := t.checkPartial(rec)
		if why := t.mismatch(rec, info); why != "" {
			err = errors.New(why)
		}
		if err == nil {
			var listing *nar.Listing
			if t.cache.WriteNARListing {
				if _, listing, err = nar.Dump(io.Discard, info.Path, true); err != nil {
					return nil, nil, fmt.Errorf("listing of %s: %w", info.Path, err)
				}
			}
			t.log.Info("resuming upload", "path", info.Path, "key", rec.Key, "bytes", rec.FileSize)
			rec.Used = time.Now()
			if err := t.saveRecord(info.Path, rec); err != nil {
				t.log.Warn("resume record", "path", info.Path, "err", err)
			}
			return rec, listing, nil
		}
		t.log.Warn("cannot resume upload; starting again", "path", info.Path, "err", err)
		t.discardRecord(ctx, info.Path, rec, mp, true)
	}
	file := t.partialFile(info.Path)
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("temp file: %w", err)
	}
	keep := false
	defer func() {
		f.Close()
		if !keep {
			os.Remove(file)
		}
	}()
	fileSum, size, listing, err := t.compressLarge(ctx, info, f)
	if err != nil {
		return nil, nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, nil, err
	}
	key := t.narKey(fileSum)
	if t.objectExists(ctx, key, size) {
		// Already uploaded (same content): nothing to resume.
		return &resumeRecord{Key: key, FileSize: size, FileHash: nixbase32.EncodeToString(fileSum), Compression: t.comp.method}, listing, nil
	}
	id, err := mp.StartMultipart(ctx, key, bucket.PutOptions{ContentType: "application/x-nix-nar"})
	if err != nil {
		return nil, nil, err
	}
	rec := &resumeRecord{Key: key, UploadID: id, File: file, FileSize: size, FileHash: nixbase32.EncodeToString(fileSum), PartSize: int64(narPartSize(mp, size)),
		Compression: t.comp.method, NarHash: nixbase32.EncodeToString(info.NarHash), NarSize: info.NarSize, Used: time.Now()}
	if err := t.saveRecord(info.Path, rec); err != nil {
		mp.AbortMultipart(context.WithoutCancel(ctx), key, id)
		return nil, nil, err
	}
	keep = true
	return rec, listing, nil
}

// narPartSize is the bucket's own part size for size bytes when it has one
// (S3: the cache URL's multipart-chunk-size), else partSize.
func narPartSize(mp bucket.Multipart, size int64) uint64 {
	if b, ok := mp.(interface{ PartSize(size int64) uint64 }); ok {
		return b.PartSize(size)
	}
	return partSize(size)
}

// partSize keeps every upload under 10,000 parts, with parts of at least
// 16 MiB.
func partSize(size int64) uint64 {
	ps := uint64(16 << 20)
	if need := uint64(size)/9000 + 1; need > ps {
		ps = (need + (1<<20 - 1)) &^ (1<<20 - 1)
	}
	return ps
}

// sendParts uploads the parts the server does not have yet and completes
// the upload. It returns the bytes sent.
func (t *narTransfer) sendParts(ctx context.Context, p string, rec *resumeRecord, mp bucket.Multipart) (uint64, error) {
	have, err := mp.ListParts(ctx, rec.Key, rec.UploadID)
	if bucket.IsNotExist(err) {
		// The upload was aborted (e.g. by stale-upload cleanup): start over.
		id, serr := mp.StartMultipart(ctx, rec.Key, bucket.PutOptions{ContentType: "application/x-nix-nar"})
		if serr != nil {
			return 0, serr
		}
		rec.UploadID, have = id, nil
		if err := t.saveRecord(p, rec); err != nil {
			return 0, err
		}
	} else if err != nil {
		return 0, err
	}
	onServer := map[int]bucket.Part{}
	for _, part := range have {
		onServer[part.Number] = part
	}
	f, err := os.Open(rec.File)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// Parts go up three at a time: while one waits for the server, the
	// next is being hashed and signed.
	n := int((rec.FileSize + rec.PartSize - 1) / rec.PartSize)
	parts := make([]bucket.Part, n)
	var sent, reused atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(3)
	for i := 0; i < n; i++ {
		off := int64(i) * rec.PartSize
		size := min(rec.PartSize, rec.FileSize-off)
		g.Go(func() error {
			// A part the server already has is kept if its ETag (the MD5
			// of its bytes) matches the local part; MD5 is computed only
			// then. New parts are protected in transit by TLS or, over
			// plain http, by the signed payload hash.
			if got, ok := onServer[i+1]; ok && got.Size == size {
				h := md5.New()
				if _, err := io.Copy(h, io.NewSectionReader(f, off, size)); err != nil {
					return err
				}
				if strings.EqualFold(got.ETag, hex.EncodeToString(h.Sum(nil))) {
					parts[i] = got
					reused.Add(1)
					return nil
				}
			}
			part, err := mp.PutPart(gctx, rec.Key, rec.UploadID, i+1, io.NewSectionReader(f, off, size), size, nil)
			if err != nil {
				return err
			}
			parts[i] = part
			sent.Add(size)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return uint64(sent.Load()), err
	}
	if err := mp.CompleteMultipart(ctx, rec.Key, rec.UploadID, parts); err != nil {
		return uint64(sent.Load()), err
	}
	if r := reused.Load(); r > 0 {
		t.log.Info("resumed upload completed", "path", p, "parts_reused", r, "parts_sent", int64(n)-r, "bytes_sent", sent.Load())
	}
	return uint64(sent.Load()), nil
}

// checkPartial verifies that the kept compressed NAR is intact.
func (t *narTransfer) checkPartial(rec *resumeRecord) error {
	f, err := os.Open(rec.File)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return err
	}
	if n != rec.FileSize || nixbase32.EncodeToString(h.Sum(nil)) != rec.FileHash {
		return errors.New("kept compressed NAR does not match its record")
	}
	return nil
}

func (t *narTransfer) saveRecord(p string, rec *resumeRecord) error {
	data, err := json.Marshal(rec)
	if err == nil {
		err = t.resume.SaveUpload(p, data)
	}
	if err != nil {
		return fmt.Errorf("save resume record of %s: %w", p, err)
	}
	return nil
}

func (t *narTransfer) loadRecord(p string) *resumeRecord {
	data, err := t.resume.LoadUpload(p)
	if err != nil || data == nil {
		return nil
	}
	var rec resumeRecord
	if json.Unmarshal(data, &rec) != nil {
		return nil
	}
	return &rec
}

// discardRecord forgets a resumable upload: the record, the kept file and,
// if abort is set, the multipart upload on the server.
func (t *narTransfer) discardRecord(ctx context.Context, p string, rec *resumeRecord, mp bucket.Multipart, abort bool) {
	if abort && rec.UploadID != "" {
		if err := mp.AbortMultipart(context.WithoutCancel(ctx), rec.Key, rec.UploadID); err != nil {
			t.log.Warn("abort multipart upload", "path", p, "err", err)
		}
	}
	if rec.File != "" {
		os.Remove(rec.File)
	}
	if err := t.resume.DeleteUpload(p); err != nil {
		t.log.Warn("delete resume record", "path", p, "err", err)
	}
}

// Discard releases the resumable upload state (kept file, record,
// multipart upload) of p and of the other paths of p's closure, once the
// job for p has ended for good (dropped, or failed permanently) and
// nothing works on them any more: it first waits (at most discardWait in
// all) for their cancelled uploads to stop, so that the files and the
// records are not pulled from under them, and keeps the state of every
// path another running job still uploads. A job queued for later that
// needs one of these paths uploads it from the start.
func (u *Uploader) Discard(ctx context.Context, p string) {
	mp, ok := u.opt.Bucket.(bucket.Multipart)
	if !ok || u.opt.Resume == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, discardWait)
	defer cancel()
	for _, q := range u.discardable(ctx, p) {
		switch err := u.waitIdle(ctx, q); {
		case errors.Is(err, errStillWanted):
			continue // another job needs q: its upload state is that job's
		case err != nil:
			u.log.Warn("upload of a discarded path did not stop in time; its resumable upload is kept, for the next upload of the path", "path", q, "job_path", p)
			return
		}
		if rec := u.nars.loadRecord(q); rec != nil {
			u.nars.discardRecord(ctx, q, rec, mp, true)
		}
	}
}

// discardable lists p and the paths of p's closure that have a resume
// record or a resumable upload running.
func (u *Uploader) discardable(ctx context.Context, p string) []string {
	out := []string{p}
	recs, err := u.opt.Resume.Uploads()
	if err != nil {
		u.log.Warn("list resume records", "err", err)
		return out
	}
	if len(recs) == 0 && !u.nars.resuming.any() {
		return out
	}
	closure, err := u.opt.Store.Closure(ctx, p)
	if err != nil {
		// Gone from the store, say: its dependencies' records age out
		// (RecoverUploads).
		u.log.Debug("closure of a discarded path", "path", p, "err", err)
		return out
	}
	for _, info := range closure {
		if q := info.Path; q != p && (recs[q] != nil || u.nars.resuming.running(q)) {
			out = append(out, q)
		}
	}
	return out
}

// waitIdle waits until no work on p is left: no job waits for it and its
// resumable upload, if any, has stopped (a node failed with its dependency
// leaves the graph at once, while its upload winds down). It returns
// errStillWanted if a job waits for p, or ctx's error.
func (u *Uploader) waitIdle(ctx context.Context, p string) error {
	if err := u.graph.waitAbandoned(ctx, p); err != nil {
		return err
	}
	if err := u.nars.resuming.wait(ctx, p); err != nil {
		return err
	}
	// A job may have started to upload p meanwhile.
	return u.graph.waitAbandoned(ctx, p)
}

// resumeWork counts the resumable uploads running, by path.
type resumeWork struct {
	mu   sync.Mutex
	runs map[string]*resumeRun
}

type resumeRun struct {
	n    int
	idle chan struct{} // closed when n drops to zero
}

// startLocked registers an upload of p; the function it returns ends it.
func (w *resumeWork) startLocked(p string) func() {
	if w.runs == nil {
		w.runs = map[string]*resumeRun{}
	}
	r := w.runs[p]
	if r == nil {
		r = &resumeRun{idle: make(chan struct{})}
		w.runs[p] = r
	}
	r.n++
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if r.n--; r.n == 0 {
			close(r.idle)
			delete(w.runs, p)
		}
	}
}

// exclusive waits until no upload of p runs, then registers one; the
// function it returns ends it.
func (w *resumeWork) exclusive(ctx context.Context, p string) (func(), error) {
	for {
		w.mu.Lock()
		r := w.runs[p]
		if r == nil {
			end := w.startLocked(p)
			w.mu.Unlock()
			return end, nil
		}
		w.mu.Unlock()
		select {
		case <-r.idle:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// releaseIfPresent drops the resumable upload state of p's closure once
// p's closure is known to be in the cache: the records of uploads that a
// crash interrupted and another writer then completed (p's own, or a
// dependency's), or that a job gave up while another writer completed
// them, are never used again. Uploads a job still waits for keep theirs;
// abandoned ones winding down are waited for (briefly). closure is p's, if
// the caller has it; otherwise it is asked for only when such records
// exist.
func (u *Uploader) releaseIfPresent(ctx context.Context, p string, closure []*nixstore.PathInfo) {
	mp, ok := u.opt.Bucket.(bucket.Multipart)
	if !ok || u.opt.Resume == nil {
		return
	}
	recs, err := u.opt.Resume.Uploads()
	if err != nil || len(recs) == 0 {
		return
	}
	candidates := map[string]bool{}
	for q := range recs {
		if !u.nars.resuming.running(q) || !u.graph.wanted(q) {
			candidates[q] = true
		}
	}
	if len(candidates) == 0 {
		return
	}
	paths := []string{p}
	if len(candidates) > 1 || !candidates[p] {
		if closure == nil {
			closure, err = u.opt.Store.Closure(ctx, p)
			if err != nil {
				u.log.Debug("closure of a path found in the cache", "path", p, "err", err)
			}
		}
		for _, info := range closure {
			paths = append(paths, info.Path)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, releaseWait)
	defer cancel()
	for _, q := range paths {
		if !candidates[q] {
			continue
		}
		delete(candidates, q) // p may appear twice
		if err := u.waitIdle(ctx, q); err != nil {
			continue // wanted again, or still winding down: kept for now
		}
		if rec := u.nars.loadRecord(q); rec != nil {
			u.log.Info("releasing the resumable upload of a path already in the cache", "path", q)
			u.nars.discardRecord(ctx, q, rec, mp, true)
		}
	}
}

// releaseWait bounds how long releaseIfPresent waits for abandoned
// uploads to stop.
const releaseWait = 10 * time.Second

// running reports whether an upload of p runs.
func (w *resumeWork) running(p string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.runs[p] != nil
}

// any reports whether any upload runs.
func (w *resumeWork) any() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.runs) > 0
}

// wait returns once no upload of p runs, or ctx's error.
func (w *resumeWork) wait(ctx context.Context, p string) error {
	for {
		w.mu.Lock()
		r := w.runs[p]
		w.mu.Unlock()
		if r == nil {
			return nil
		}
		select {
		case <-r.idle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// discardWait bounds how long Discard waits for a cancelled upload to stop.
const discardWait = time.Minute

// RecoverUploads runs at start: it removes kept files no record refers to,
// and records whose file is gone or that went unused for staleResume
// (aborting their uploads).
func (u *Uploader) RecoverUploads(ctx context.Context) error {
	if u.opt.Resume == nil {
		return nil
	}
	recs, err := u.opt.Resume.Uploads()
	if err != nil {
		return err
	}
	files := map[string]bool{}
	mp, _ := u.opt.Bucket.(bucket.Multipart)
	for p, data := range recs {
		var rec resumeRecord
		if json.Unmarshal(data, &rec) != nil {
			u.opt.Resume.DeleteUpload(p)
			continue
		}
		fi, err := os.Stat(rec.File)
		if err != nil && mp != nil {
			u.nars.discardRecord(ctx, p, &rec, mp, true)
			continue
		}
		if used := rec.Used; err == nil && mp != nil {
			if used.IsZero() {
				used = fi.ModTime()
			}
			if age := time.Since(used); age > staleResume {
				u.log.Info("releasing a resumable upload unused for too long", "path", p, "unused_for", age.Round(time.Minute))
				u.nars.discardRecord(ctx, p, &rec, mp, true)
				continue
			}
		}
		files[rec.File] = true
	}
	kept, _ := filepath.Glob(filepath.Join(u.opt.TempDir, "nar-*"+partialSuffix))
	for _, f := range kept {
		if !files[f] {
			os.Remove(f)
		}
	}
	if len(recs) > 0 {
		u.log.Info("resumable uploads found", "count", len(files))
	}
	return nil
}

// AbortStaleUploads aborts multipart uploads of NARs that were started more
// than olderThan ago and that no resume record of this agent refers to:
// leftovers of crashes that nobody will complete. Younger ones may belong to
// another machine's agent, still uploading. (MinIO lists uploads of exact
// keys only, and expires stale ones itself.)
func (u *Uploader) AbortStaleUploads(ctx context.Context, olderThan time.Duration) (int, error) {
	mp, ok := u.opt.Bucket.(bucket.Multipart)
	if !ok {
		return 0, nil
	}
	ours := map[string]bool{}
	if u.opt.Resume != nil {
		recs, err := u.opt.Resume.Uploads()
		if err != nil {
			return 0, err
		}
		for _, data := range recs {
			var rec resumeRecord
			if json.Unmarshal(data, &rec) == nil && rec.UploadID != "" {
				ours[rec.UploadID] = true
			}
		}
	}
	ups, err := mp.ListUploads(ctx, cachefmt.NARPrefix)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, up := range ups {
		if ours[up.UploadID] || time.Since(up.Initiated) < olderThan {
			continue
		}
		if err := mp.AbortMultipart(ctx, up.Key, up.UploadID); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
