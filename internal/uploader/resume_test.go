package uploader

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/nar"
)

// memResume is an in-memory ResumeStore.
type memResume struct {
	mu   sync.Mutex
	recs map[string][]byte
}

func (m *memResume) SaveUpload(p string, rec []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.recs == nil {
		m.recs = map[string][]byte{}
	}
	m.recs[p] = bytes.Clone(rec)
	return nil
}

func (m *memResume) LoadUpload(p string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.recs[p]), nil
}

func (m *memResume) DeleteUpload(p string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.recs, p)
	return nil
}

func (m *memResume) Uploads() (map[string][]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string][]byte{}
	for k, v := range m.recs {
		out[k] = bytes.Clone(v)
	}
	return out, nil
}

// fakeMultipart adds multipart uploads to a bucket, as a bucket under a key
// prefix sees them (keys relative to the prefix, like bucket/s3): it keeps
// uploads by full key and records which ones were aborted. failParts makes
// PutPart fail with a transient error.
type fakeMultipart struct {
	bucket.Bucket
	prefix string

	mu        sync.Mutex
	next      int
	uploads   map[string]*fakeUpload // upload id → upload
	aborted   []string               // full keys
	failParts bool
	// partGate, if set, holds every PutPart until it is closed (or the
	// part's context is done); partStarted is told of each waiting part.
	partGate    chan struct{}
	partStarted chan struct{}
}

type fakeUpload struct {
	key       string // full key
	initiated time.Time
	parts     map[int][]byte
}

func (f *fakeMultipart) StartMultipart(_ context.Context, key string, _ bucket.PutOptions) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next++
	id := fmt.Sprintf("upload-%d", f.next)
	if f.uploads == nil {
		f.uploads = map[string]*fakeUpload{}
	}
	f.uploads[id] = &fakeUpload{key: f.prefix + key, initiated: time.Now(), parts: map[int][]byte{}}
	return id, nil
}

func (f *fakeMultipart) upload(key, id string) (*fakeUpload, error) {
	up := f.uploads[id]
	if up == nil || up.key != f.prefix+key {
		return nil, fmt.Errorf("upload %s of %s: %w", id, key, bucket.ErrNotExist)
	}
	return up, nil
}

func (f *fakeMultipart) ListParts(_ context.Context, key, id string) ([]bucket.Part, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	up, err := f.upload(key, id)
	if err != nil {
		return nil, err
	}
	var out []bucket.Part
	for n, b := range up.parts {
		out = append(out, bucket.Part{Number: n, Size: int64(len(b)), ETag: fmt.Sprintf("%x", md5sum(b))})
	}
	return out, nil
}

func (f *fakeMultipart) PutPart(ctx context.Context, key, id string, n int, r io.Reader, size int64, _ []byte) (bucket.Part, error) {
	if f.partGate != nil {
		select {
		case f.partStarted <- struct{}{}:
		default:
		}
		select {
		case <-f.partGate:
		case <-ctx.Done():
			return bucket.Part{}, ctx.Err()
		}
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return bucket.Part{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failParts {
		return bucket.Part{}, errors.New("connection reset by peer (injected)")
	}
	up, err := f.upload(key, id)
	if err != nil {
		return bucket.Part{}, err
	}
	up.parts[n] = b
	return bucket.Part{Number: n, Size: int64(len(b)), ETag: fmt.Sprintf("%x", md5sum(b))}, nil
}

func (f *fakeMultipart) CompleteMultipart(ctx context.Context, key, id string, parts []bucket.Part) error {
	f.mu.Lock()
	up, err := f.upload(key, id)
	var body []byte
	if err == nil {
		for _, p := range parts {
			body = append(body, up.parts[p.Number]...)
		}
		delete(f.uploads, id)
	}
	f.mu.Unlock()
	if err != nil {
		return err
	}
	_, err = f.Bucket.Put(ctx, key, bytes.NewReader(body), int64(len(body)), bucket.PutOptions{})
	return err
}

func (f *fakeMultipart) AbortMultipart(_ context.Context, key, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	up, err := f.upload(key, id)
	if err != nil {
		return err
	}
	delete(f.uploads, id)
	f.aborted = append(f.aborted, up.key)
	return nil
}

func (f *fakeMultipart) ListUploads(_ context.Context, prefix string) ([]bucket.Upload, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []bucket.Upload
	for id, up := range f.uploads {
		if strings.HasPrefix(up.key, f.prefix+prefix) {
			out = append(out, bucket.Upload{Key: strings.TrimPrefix(up.key, f.prefix), UploadID: id, Initiated: up.initiated})
		}
	}
	return out, nil
}

func md5sum(b []byte) []byte {
	s := md5.Sum(b)
	return s[:]
}

func (f *fakeMultipart) abortedKeys() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.aborted)
}

// resumableUploader is an uploader of f's paths that uploads every NAR as a
// resumable multipart upload, with the given compression.
func (f *fixture) resumableUploader(t *testing.T, mp *fakeMultipart, rs ResumeStore, compression string) *Uploader {
	t.Helper()
	c, err := cacheurl.Parse("file://" + filepath.Join(f.dir, "cache") + "?compression=" + compression)
	if err != nil {
		t.Fatal(err)
	}
	u, err := New(Options{Bucket: mp, Cache: c, Store: f.store, Keys: []signature.SecretKey{f.key},
		TempDir: filepath.Join(f.dir, "tmp"), Resume: rs, ResumeAbove: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	return u
}

// checkNAR checks that p0's narinfo describes the object it names: its
// Compression, and the NAR the object decompresses to (NarHash, NarSize).
func (f *fixture) checkNAR(t *testing.T, wantCompression string) {
	t.Helper()
	ni := f.narinfo(t, 0)
	info := f.store.infos[f.path(0)]
	if ni.Compression != wantCompression {
		t.Fatalf("narinfo says Compression: %s, want %s", ni.Compression, wantCompression)
	}
	obj, _, err := f.rec.Get(context.Background(), ni.URL, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	narBytes := obj
	if ni.Compression == "zstd" {
		d, _ := zstd.NewReader(nil)
		defer d.Close()
		if narBytes, err = d.DecodeAll(obj, nil); err != nil {
			t.Fatalf("NAR object %s is not zstd as its narinfo says: %v", ni.URL, err)
		}
	}
	sum := sha256.Sum256(narBytes)
	if !bytes.Equal(sum[:], info.NarHash) || uint64(len(narBytes)) != info.NarSize || ni.NarSize != info.NarSize {
		t.Fatalf("NAR object %s (Compression: %s) does not hold the path's NAR", ni.URL, ni.Compression)
	}
	if ni.FileSize != uint64(len(obj)) {
		t.Fatalf("narinfo FileSize %d, object has %d bytes", ni.FileSize, len(obj))
	}
}

// interrupt starts a resumable upload of p0 that fails after its multipart
// upload started, leaving a resume record, a kept file and the upload.
func (f *fixture) interrupt(t *testing.T, mp *fakeMultipart, rs *memResume, compression string) {
	t.Helper()
	mp.failParts = true
	u := f.resumableUploader(t, mp, rs, compression)
	if _, err := u.Upload(context.Background(), f.path(0)); err == nil || IsPermanent(err) {
		t.Fatalf("interrupted upload = %v, want a transient error", err)
	}
	mp.failParts = false
	if recs, _ := rs.Uploads(); len(recs) != 1 {
		t.Fatalf("resume records after the interruption: %d, want 1", len(recs))
	}
}

// TestResumeAfterCompressionChange: the operator changes compression=
// between an interrupted upload and the next attempt. The kept file (zstd)
// must not be published under a narinfo that says none: the record is
// discarded, its upload aborted, and the NAR uploaded again as configured.
func TestResumeAfterCompressionChange(t *testing.T) {
	f := newFixture(t, nil)
	mp := &fakeMultipart{Bucket: f.rec}
	rs := &memResume{}
	f.interrupt(t, mp, rs, "zstd")

	u := f.resumableUploader(t, mp, rs, "none")
	if _, err := u.Upload(context.Background(), f.path(0)); err != nil {
		t.Fatal(err)
	}
	f.checkNAR(t, "none")
	if got := mp.abortedKeys(); len(got) != 1 || !strings.HasSuffix(got[0], ".nar.zst") {
		t.Fatalf("aborted uploads = %v, want the zstd one", got)
	}
	if kept, _ := filepath.Glob(filepath.Join(f.dir, "tmp", "*"+partialSuffix)); len(kept) != 0 {
		t.Fatalf("kept files left: %v", kept)
	}
	if recs, _ := rs.Uploads(); len(recs) != 0 {
		t.Fatalf("resume records left: %v", recs)
	}
}

// TestResumeAfterPathChanged: the store path was collected and built again
// with other contents (a non-reproducible build) between two attempts. The
// kept file holds the old NAR: it must not be published under the new
// NarHash.
func TestResumeAfterPathChanged(t *testing.T) {
	f := newFixture(t, nil)
	mp := &fakeMultipart{Bucket: f.rec}
	rs := &memResume{}
	f.interrupt(t, mp, rs, "zstd")

	p := f.path(0)
	if err := os.WriteFile(filepath.Join(p, "data"), []byte("built again, other bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, _, err := nar.Dump(h, p, false)
	if err != nil {
		t.Fatal(err)
	}
	f.store.infos[p].NarHash, f.store.infos[p].NarSize = h.Sum(nil), uint64(n)

	u := f.resumableUploader(t, mp, rs, "zstd")
	if _, err := u.Upload(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	f.checkNAR(t, "zstd")
	if got := mp.abortedKeys(); len(got) != 1 {
		t.Fatalf("aborted uploads = %v, want the old one", got)
	}
}

// TestResumeSameConfigurationResumes: nothing changed, so the interrupted
// upload is continued, not started over.
func TestResumeSameConfigurationResumes(t *testing.T) {
	f := newFixture(t, nil)
	mp := &fakeMultipart{Bucket: f.rec}
	rs := &memResume{}
	f.interrupt(t, mp, rs, "zstd")
	u := f.resumableUploader(t, mp, rs, "zstd")
	if _, err := u.Upload(context.Background(), f.path(0)); err != nil {
		t.Fatal(err)
	}
	f.checkNAR(t, "zstd")
	if got := mp.abortedKeys(); len(got) != 0 {
		t.Fatalf("aborted uploads = %v, want the interrupted one resumed", got)
	}
}

// TestAbortStaleUploads: in a cache under a key prefix, stale-upload
// cleanup lists and aborts NAR uploads by keys relative to the prefix; it
// aborts an old upload nobody resumes, and spares this agent's own
// resumable upload (however old) and young uploads (maybe another
// machine's, still running).
func TestAbortStaleUploads(t *testing.T) {
	c, err := cacheurl.Parse("s3://bucket/prefix?endpoint=127.0.0.1:1&scheme=http")
	if err != nil {
		t.Fatal(err)
	}
	mp := &fakeMultipart{prefix: c.Prefix, uploads: map[string]*fakeUpload{}}
	old, young := time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)
	add := func(id, key string, at time.Time) {
		mp.uploads[id] = &fakeUpload{key: c.Prefix + key, initiated: at, parts: map[int][]byte{}}
	}
	add("stale", "nar/aaaa.nar.zst", old)
	add("ours", "nar/bbbb.nar.zst", old)
	add("young", "nar/cccc.nar.zst", young)
	add("elsewhere", "log/dddd.drv", old) // not a NAR: not ours to clean up
	rs := &memResume{}
	rs.SaveUpload("/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b", []byte(`{"key":"nar/bbbb.nar.zst","upload_id":"ours"}`))
	u, err := New(Options{Bucket: mp, Cache: c, TempDir: t.TempDir(), Resume: rs})
	if err != nil {
		t.Fatal(err)
	}
	n, err := u.AbortStaleUploads(context.Background(), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := mp.abortedKeys(); n != 1 || len(got) != 1 || got[0] != "prefix/nar/aaaa.nar.zst" {
		t.Fatalf("aborted %d: %v, want only prefix/nar/aaaa.nar.zst", n, got)
	}
	for _, id := range []string{"ours", "young", "elsewhere"} {
		if mp.uploads[id] == nil {
			t.Errorf("upload %q was aborted", id)
		}
	}
}

// TestDiscardWaitsForTheUpload: a dropped job's upload state is discarded
// only once its upload has stopped, and not at all while another job still
// uploads the same path.
func TestDiscardWaitsForTheUpload(t *testing.T) {
	f := newFixture(t, nil)
	mp := &fakeMultipart{Bucket: f.rec, partGate: make(chan struct{}), partStarted: make(chan struct{}, 1)}
	rs := &memResume{}
	u := f.resumableUploader(t, mp, rs, "none")
	bg := context.Background()

	// Two jobs want p0; the first is dropped while a part is on its way.
	ctxA, cancelA := context.WithCancel(bg)
	errA, errB := make(chan error, 1), make(chan error, 1)
	go func() { _, err := u.Upload(ctxA, f.path(0)); errA <- err }()
	<-mp.partStarted
	go func() { _, err := u.Upload(bg, f.path(0)); errB <- err }()
	waitFor(t, func() bool {
		u.graph.mu.Lock()
		defer u.graph.mu.Unlock()
		n := u.graph.nodes[f.path(0)]
		return n != nil && n.interest == 2
	})
	cancelA()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Fatalf("dropped job: %v", err)
	}
	u.Discard(bg, f.path(0))
	if recs, _ := rs.Uploads(); len(recs) != 1 || len(mp.abortedKeys()) != 0 {
		t.Fatalf("Discard while another job uploads the path: %d records left, aborted %v", len(recs), mp.abortedKeys())
	}
	close(mp.partGate)
	if err := <-errB; err != nil {
		t.Fatalf("the other job: %v", err)
	}
	f.checkNAR(t, "none")

	// Alone: Discard waits until the cancelled upload has stopped.
	f2 := newFixture(t, nil)
	mp2 := &fakeMultipart{Bucket: f2.rec, partGate: make(chan struct{}), partStarted: make(chan struct{}, 1)}
	rs2 := &memResume{}
	u2 := f2.resumableUploader(t, mp2, rs2, "none")
	ctxC, cancelC := context.WithCancel(bg)
	errC := make(chan error, 1)
	go func() { _, err := u2.Upload(ctxC, f2.path(0)); errC <- err }()
	<-mp2.partStarted
	u2.graph.mu.Lock()
	n := u2.graph.nodes[f2.path(0)]
	u2.graph.mu.Unlock()
	cancelC()
	<-errC
	u2.Discard(bg, f2.path(0))
	select {
	case <-n.done:
	default:
		t.Fatal("Discard returned while the upload was still running")
	}
	if recs, _ := rs2.Uploads(); len(recs) != 0 {
		t.Fatalf("%d resume records left after Discard", len(recs))
	}
}

// released checks that no resumable upload state is left: no record, no
// kept file, no multipart upload open, and that aborted uploads were
// aborted.
func (f *fixture) released(t *testing.T, mp *fakeMultipart, rs *memResume, aborted int) {
	t.Helper()
	if recs, _ := rs.Uploads(); len(recs) != 0 {
		t.Errorf("%d resume records left", len(recs))
	}
	if kept, _ := filepath.Glob(filepath.Join(f.dir, "tmp", "*"+partialSuffix)); len(kept) != 0 {
		t.Errorf("kept files left: %v", kept)
	}
	mp.mu.Lock()
	open := len(mp.uploads)
	mp.mu.Unlock()
	if got := mp.abortedKeys(); open != 0 || len(got) != aborted {
		t.Errorf("%d multipart uploads left open; aborted %v, want %d", open, got, aborted)
	}
}

// TestDiscardReleasesDependencies: a job is dropped while its path and a
// dependency are both being uploaded: the dependency's resumable upload
// state goes too, not only the path's.
func TestDiscardReleasesDependencies(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	mp := &fakeMultipart{Bucket: f.rec, partGate: make(chan struct{})}
	rs := &memResume{}
	u := f.resumableUploader(t, mp, rs, "none")

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := u.Upload(ctx, f.path(1)); errc <- err }()
	waitFor(t, func() bool { recs, _ := rs.Uploads(); return len(recs) == 2 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("dropped job: %v", err)
	}
	u.Discard(context.Background(), f.path(1))
	f.released(t, mp, rs, 2)
}

// failingParts fails the parts of one key for good, once release is
// closed; other parts go to the fake multipart bucket.
type failingParts struct {
	*fakeMultipart
	key     string
	release chan struct{}
}

func (b *failingParts) PutPart(ctx context.Context, key, id string, n int, r io.Reader, size int64, sum []byte) (bucket.Part, error) {
	if key != b.key {
		return b.fakeMultipart.PutPart(ctx, key, id, n, r, size, sum)
	}
	select {
	case <-b.release:
	case <-ctx.Done():
		return bucket.Part{}, ctx.Err()
	}
	return bucket.Part{}, fmt.Errorf("put part %d of %s: %w", n, key, bucket.ErrPermanent)
}

// TestPermanentFailureReleasesDependencies: a path fails for good while
// its dependency's upload is under way: once its job is given up, the
// dependency's resumable upload state is released as well (a transient
// failure keeps it: see interrupt).
func TestPermanentFailureReleasesDependencies(t *testing.T) {
	f := newFixture(t, map[int][]int{1: {0}})
	mp := &fakeMultipart{Bucket: f.rec, partGate: make(chan struct{})}
	rs := &memResume{}
	c, err := cacheurl.Parse("file://" + filepath.Join(f.dir, "cache") + "?compression=none")
	if err != nil {
		t.Fatal(err)
	}
	// Uncompressed, the NAR file's hash is the NAR hash.
	b := &failingParts{fakeMultipart: mp, release: make(chan struct{})}
	u, err := New(Options{Bucket: b, Cache: c, Store: f.store, Keys: []signature.SecretKey{f.key},
		TempDir: filepath.Join(f.dir, "tmp"), Resume: rs, ResumeAbove: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	b.key = u.nars.narKey(f.store.infos[f.path(1)].NarHash)

	errc := make(chan error, 1)
	go func() { _, err := u.Upload(context.Background(), f.path(1)); errc <- err }()
	waitFor(t, func() bool { recs, _ := rs.Uploads(); return len(recs) == 2 })
	close(b.release)
	if err := <-errc; !IsPermanent(err) {
		t.Fatalf("upload = %v, want a permanent failure", err)
	}
	u.Discard(context.Background(), f.path(1))
	f.released(t, mp, rs, 2)
}

// TestRecoverReleasesStaleRecords: at start, resume records nobody used
// for longer than staleResume are released (their file removed, their
// upload aborted); younger ones are kept. Records from before Used
// existed are aged by their kept file.
func TestRecoverReleasesStaleRecords(t *testing.T) {
	f := newFixture(t, nil)
	mp := &fakeMultipart{Bucket: f.rec}
	rs := &memResume{}
	u := f.resumableUploader(t, mp, rs, "none")
	bg := context.Background()
	old := time.Now().Add(-staleResume - time.Hour)
	recs := []struct {
		used, file time.Time
		stale      bool
	}{
		{used: time.Now(), file: old},              // resumed lately
		{used: old, file: time.Now(), stale: true}, // left long ago
		{file: old, stale: true},                   // older record, old file
		{file: time.Now()},                         // older record, new file
	}
	for i, r := range recs {
		p := f.path(i)
		key := fmt.Sprintf("nar/%d.nar", i)
		id, _ := mp.StartMultipart(bg, key, bucket.PutOptions{})
		file := u.nars.partialFile(p)
		if err := os.WriteFile(file, []byte("compressed"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(file, r.file, r.file); err != nil {
			t.Fatal(err)
		}
		if err := u.nars.saveRecord(p, &resumeRecord{Key: key, UploadID: id, File: file, FileSize: 10, Used: r.used}); err != nil {
			t.Fatal(err)
		}
	}
	if err := u.RecoverUploads(bg); err != nil {
		t.Fatal(err)
	}
	var aborted []string
	for i, r := range recs {
		rec := u.nars.loadRecord(f.path(i))
		_, ferr := os.Stat(u.nars.partialFile(f.path(i)))
		switch {
		case r.stale && (rec != nil || ferr == nil):
			t.Errorf("record %d: stale, but its record or file is kept", i)
		case !r.stale && (rec == nil || ferr != nil):
			t.Errorf("record %d: in use, but its record or file is gone", i)
		}
		if r.stale {
			aborted = append(aborted, fmt.Sprintf("nar/%d.nar", i))
		}
	}
	got := mp.abortedKeys()
	slices.Sort(got)
	if !slices.Equal(got, aborted) {
		t.Errorf("aborted %v, want %v", got, aborted)
	}
}

// TestRecordReleasedWhenAnotherWriterCompleted: an upload interrupted by a
// crash leaves its resume record; another machine then uploads the path.
// The next push of it finds it in the cache and must release the record,
// the kept file and the multipart upload, which nothing would use again.
func TestRecordReleasedWhenAnotherWriterCompleted(t *testing.T) {
	f := newFixture(t, nil)
	mp := &fakeMultipart{Bucket: f.rec}
	rs := &memResume{}
	f.interrupt(t, mp, rs, "zstd")
	other := f.resumableUploader(t, &fakeMultipart{Bucket: f.rec}, &memResume{}, "zstd")
	if _, err := other.Upload(context.Background(), f.path(0)); err != nil {
		t.Fatal(err)
	}
	u := f.resumableUploader(t, mp, rs, "zstd")
	if _, err := u.Upload(context.Background(), f.path(0)); err != nil {
		t.Fatal(err)
	}
	if recs, _ := rs.Uploads(); len(recs) != 0 {
		t.Fatalf("resume records left: %d", len(recs))
	}
	if got := mp.abortedKeys(); len(got) != 1 {
		t.Fatalf("aborted uploads = %v, want the interrupted one", got)
	}
	if kept, _ := filepath.Glob(filepath.Join(f.dir, "tmp", "nar-*"+partialSuffix)); len(kept) != 0 {
		t.Fatalf("kept files left: %v", kept)
	}
}

// TestDependencyRecordReleased: the interrupted upload was a dependency's
// (p0), and another writer then completed it, alone or with the path that
// needs it (p1). The next push of p1, which finds the closure in the cache
// or uploads p1 itself, releases the dependency's record too (no upload of
// it is left to resume).
func TestDependencyRecordReleased(t *testing.T) {
	for _, tc := range []struct {
		name         string
		otherUploads int // what the other writer uploads
	}{
		{"closure present", 1},
		{"dependency present", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, map[int][]int{1: {0}})
			mp := &fakeMultipart{Bucket: f.rec}
			rs := &memResume{}
			f.interrupt(t, mp, rs, "zstd")
			other := f.resumableUploader(t, &fakeMultipart{Bucket: f.rec}, &memResume{}, "zstd")
			if _, err := other.Upload(context.Background(), f.path(tc.otherUploads)); err != nil {
				t.Fatal(err)
			}
			u := f.resumableUploader(t, mp, rs, "zstd")
			if _, err := u.Upload(context.Background(), f.path(1)); err != nil {
				t.Fatal(err)
			}
			f.narinfo(t, 1) // in the cache
			f.released(t, mp, rs, 1)
		})
	}
}

// TestOneResumableUploadOfAPathAtATime: a second upload of a path (a node
// that replaced a cancelled one) waits until the first has wound down, so
// the two never share the record and the kept file.
func TestOneResumableUploadOfAPathAtATime(t *testing.T) {
	var w resumeWork
	ctx := context.Background()
	end1, err := w.exclusive(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	second := make(chan func())
	go func() {
		end2, _ := w.exclusive(ctx, "p")
		second <- end2
	}()
	other, err := w.exclusive(ctx, "q") // another path does not wait
	if err != nil {
		t.Fatal(err)
	}
	other()
	select {
	case <-second:
		t.Fatal("a second upload of the same path started while the first ran")
	case <-time.After(50 * time.Millisecond):
	}
	end1()
	select {
	case end2 := <-second:
		end2()
	case <-time.After(10 * time.Second):
		t.Fatal("the second upload did not start once the first ended")
	}
	if w.running("p") {
		t.Fatal("still registered after both ended")
	}
}
