package robustness

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
)

// Semantics are the behaviours a real object store may have that the
// safety arguments must survive. One set is drawn per run from its seed.
type Semantics struct {
	// StampAtStart: LastModified is the time the request began (MinIO
	// assigns modTime before its metadata commit; file:// uses the temp
	// file's mtime), not the time the object became visible.
	StampAtStart bool
	// ListLag: a listing shows objects only this long after they became
	// visible to GET and HEAD (and still shows deleted ones as long).
	ListLag time.Duration
	// IfNoneMatch and IfMatch: "honour", "ignore" (the write goes through
	// as if unconditional) or "refuse" (a 501: the store does not support
	// conditional writes at all).
	IfNoneMatch, IfMatch string
	// ClockSkew is the store's clock minus the local clock.
	ClockSkew time.Duration
	// EstimateError is how far clients' estimates of the store's clock
	// are off (a Date header stamped at the end of a long request); the
	// bound they report is one second, as for the S3 client's estimate.
	EstimateError time.Duration
	// Latency is the upper bound of the random delay of each request.
	Latency time.Duration
	// MultipartExpiry is when the store's lifecycle rule aborts a
	// multipart upload that was not completed.
	MultipartExpiry time.Duration
	// FaultRate is the probability that a request fails (429, 503, a
	// timeout or a connection reset mid-body).
	FaultRate float64
}

func (s Semantics) String() string {
	return fmt.Sprintf("stamp-at-start=%v list-lag=%s if-none-match=%s if-match=%s skew=%s estimate-error=%s latency=%s faults=%.3f multipart-expiry=%s",
		s.StampAtStart, s.ListLag, s.IfNoneMatch, s.IfMatch, s.ClockSkew, s.EstimateError, s.Latency, s.FaultRate, s.MultipartExpiry)
}

// drawSemantics picks a store's behaviour.
func drawSemantics(r *rand.Rand) Semantics {
	cond := func() string {
		switch n := r.IntN(10); {
		case n < 7:
			return "honour"
		case n < 9:
			return "ignore"
		default:
			return "refuse"
		}
	}
	s := Semantics{
		StampAtStart:    r.IntN(2) == 0,
		ListLag:         []time.Duration{0, 0, 50 * time.Millisecond, 300 * time.Millisecond}[r.IntN(4)],
		IfNoneMatch:     cond(),
		ClockSkew:       time.Duration(r.IntN(2001)-1000) * time.Millisecond,
		EstimateError:   time.Duration(r.IntN(1601)-800) * time.Millisecond,
		Latency:         []time.Duration{0, time.Millisecond, 5 * time.Millisecond}[r.IntN(3)],
		FaultRate:       []float64{0, 0.005, 0.02}[r.IntN(3)],
		MultipartExpiry: []time.Duration{500 * time.Millisecond, 3 * time.Second, time.Hour}[r.IntN(3)],
	}
	// A store that refuses If-None-Match refuses If-Match too; a store may
	// honour If-None-Match and still ignore If-Match.
	if s.IfNoneMatch == "refuse" {
		s.IfMatch = "refuse"
	} else {
		s.IfMatch = []string{"honour", "honour", "ignore"}[r.IntN(3)]
	}
	return s
}

// object is one version of a key.
type object struct {
	data     []byte
	etag     string
	modified time.Time // LastModified, by the store's clock
	visible  time.Time // local time it became visible to GET/HEAD
	encoding string
	ctype    string
}

// tombstone remembers a deletion for lagging listings.
type tombstone struct {
	obj     *object
	deleted time.Time
}

// ObjectStore is an adversarial in-memory object store: the server. Every
// client (an agent, a collector) talks to it through its own Client.
type ObjectStore struct {
	sem Semantics

	mu      sync.Mutex
	objects map[string]*object
	deleted map[string]tombstone
	mp      uploads
	etagSeq int64
	rng     *rand.Rand // under mu

	// history, for the invariants
	resets     []time.Time
	violations []string
	replaced   int // same-content rewrites (harmless)
	faults     map[string]int
	requests   atomic.Int64
	collected  int // objects deleted by collectors
	// history keeps the last writes and deletes of each narinfo, to
	// explain a violation.
	history map[string][]string
	start   time.Time
}

// note records an event of key (under mu).
func (s *ObjectStore) note(key, format string, args ...any) {
	if !strings.HasSuffix(key, ".narinfo") && !strings.HasPrefix(key, "nar/") {
		return
	}
	h := append(s.history[key], fmt.Sprintf("%s +%s: ", key, time.Since(s.start).Round(time.Millisecond))+fmt.Sprintf(format, args...))
	if len(h) > 8 {
		h = h[len(h)-8:]
	}
	s.history[key] = h
}

// History returns the recorded events of key.
func (s *ObjectStore) History(key string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.history[key]...)
}

func newObjectStore(sem Semantics, seed uint64) *ObjectStore {
	return &ObjectStore{
		sem:     sem,
		objects: map[string]*object{},
		deleted: map[string]tombstone{},
		rng:     rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		faults:  map[string]int{},
		history: map[string][]string{},
		mp:      uploads{byID: map[string]*multipartUpload{}},
		start:   time.Now(),
	}
}

func (s *ObjectStore) storeNow() time.Time { return time.Now().Add(s.sem.ClockSkew) }

func (s *ObjectStore) randFloat() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rng.Float64()
}

func (s *ObjectStore) randN(n int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rng.IntN(n)
}

func (s *ObjectStore) countFault(kind string) {
	s.mu.Lock()
	s.faults[kind]++
	s.mu.Unlock()
}

// Reset empties the bucket at once, as an operator's `mc rm --recursive`
// finished in one instant would.
func (s *ObjectStore) Reset() {
	s.mu.Lock()
	now := time.Now()
	for k, o := range s.objects {
		s.deleted[k] = tombstone{obj: o, deleted: now}
	}
	s.objects = map[string]*object{}
	s.resets = append(s.resets, now)
	for k := range s.history {
		s.note(k, "reset")
	}
	s.mu.Unlock()
}

func (s *ObjectStore) lastReset() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.resets) == 0 {
		return time.Time{}
	}
	return s.resets[len(s.resets)-1]
}

func (s *ObjectStore) violate(format string, args ...any) {
	s.mu.Lock()
	s.violations = append(s.violations, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

// Snapshot returns the visible objects' contents.
func (s *ObjectStore) Snapshot() map[string][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string][]byte, len(s.objects))
	for k, o := range s.objects {
		out[k] = o.data
	}
	return out
}

// immutable reports whether key names an object nixspool must never
// replace with other content once written.
func immutable(key string) bool {
	return key == "nix-cache-info" || strings.HasSuffix(key, ".narinfo") || strings.HasPrefix(key, "realisations/") || strings.HasPrefix(key, "build-trace")
}

// brokenNarinfoLocked reports whether old, the object at key, is a
// narinfo whose NAR is not there or not of the size it claims. Callers
// hold s.mu.
func (s *ObjectStore) brokenNarinfoLocked(key string, old *object) bool {
	if !strings.HasSuffix(key, ".narinfo") {
		return false
	}
	plain, err := cachefmt.DecodeContentEncoding(old.encoding, old.data)
	if err != nil {
		return true
	}
	ni, err := cachefmt.ParseNarInfo(plain)
	if err != nil {
		return true
	}
	nar, ok := s.objects[ni.URL]
	return !ok || (ni.FileSize >= 0 && int64(len(nar.data)) != ni.FileSize)
}

// errFault builds an injected error of the kind a real client reports.
func errFault(kind string) error {
	switch kind {
	case "throttle":
		return fmt.Errorf("injected 429 SlowDown: %w", errors.Join(bucket.ErrUnavailable, bucket.ErrThrottled))
	case "unavailable":
		return fmt.Errorf("injected 503 Service Unavailable: %w", bucket.ErrUnavailable)
	case "timeout":
		return fmt.Errorf("injected timeout: %w", bucket.ErrUnavailable)
	default:
		return fmt.Errorf("injected connection reset: %w", bucket.ErrUnavailable)
	}
}

// Client is one process's connection to the store: it can be paused (the
// process stops, its requests wait) and crashed (requests in flight end;
// a write already received may still land).
type Client struct {
	s    *ObjectStore
	name string

	pauseMu sync.Mutex
	resume  chan struct{} // non-nil while paused

	// lastGenCheck is when the latest completed GET of nix-cache-info
	// began: the freshest generation confirmation this client has.
	lastGenCheck atomic.Int64
}

func (s *ObjectStore) client(name string) *Client { return &Client{s: s, name: name} }

// Pause holds every request of the client until Resume.
func (c *Client) Pause() {
	c.pauseMu.Lock()
	if c.resume == nil {
		c.resume = make(chan struct{})
	}
	c.pauseMu.Unlock()
}

// Resume releases the client's requests.
func (c *Client) Resume() {
	c.pauseMu.Lock()
	if c.resume != nil {
		close(c.resume)
		c.resume = nil
	}
	c.pauseMu.Unlock()
}

func (c *Client) gate(ctx context.Context) error {
	c.pauseMu.Lock()
	ch := c.resume
	c.pauseMu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// begin runs before each request: pause gate, latency, maybe a fault.
func (c *Client) begin(ctx context.Context, op string) error {
	c.s.requests.Add(1)
	if err := c.gate(ctx); err != nil {
		return err
	}
	if l := c.s.sem.Latency; l > 0 {
		d := time.Duration(c.s.randN(int(l) + 1))
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.s.sem.FaultRate > 0 && c.s.randFloat() < c.s.sem.FaultRate && op != "put-body" {
		kind := []string{"throttle", "unavailable", "timeout", "reset"}[c.s.randN(4)]
		c.s.countFault(kind)
		return errFault(kind)
	}
	return nil
}

// Now is the client's estimate of the store's clock.
func (c *Client) Now() time.Time { return c.s.storeNow().Add(c.s.sem.EstimateError) }

// NowWithin is Now with the bound of its error the client claims.
func (c *Client) NowWithin() (time.Time, time.Duration) { return c.Now(), time.Second }

func (c *Client) String() string { return "robustness://" + c.name }

func info(o *object) bucket.Info {
	return bucket.Info{Size: int64(len(o.data)), ETag: o.etag, LastModified: o.modified, ContentEncoding: o.encoding}
}

// Stat implements bucket.Bucket.
func (c *Client) Stat(ctx context.Context, key string) (bucket.Info, error) {
	if err := c.begin(ctx, "stat"); err != nil {
		return bucket.Info{}, err
	}
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	o, ok := c.s.objects[key]
	if !ok {
		return bucket.Info{}, fmt.Errorf("stat %s: %w", key, bucket.ErrNotExist)
	}
	return info(o), nil
}

// Get implements bucket.Bucket.
func (c *Client) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	started := time.Now()
	if err := c.begin(ctx, "get"); err != nil {
		return nil, bucket.Info{}, err
	}
	c.s.mu.Lock()
	o, ok := c.s.objects[key]
	c.s.mu.Unlock()
	if key == "nix-cache-info" {
		defer c.lastGenCheck.Store(started.UnixNano())
	}
	if !ok {
		return nil, bucket.Info{}, fmt.Errorf("get %s: %w", key, bucket.ErrNotExist)
	}
	if int64(len(o.data)) > max {
		return nil, bucket.Info{}, fmt.Errorf("get %s: %d bytes, more than %d: %w", key, len(o.data), max, bucket.ErrPermanent)
	}
	return bytes.Clone(o.data), info(o), nil
}

// Open implements bucket.Bucket.
func (c *Client) Open(ctx context.Context, key string, offset, length int64) (io.ReadCloser, bucket.Info, error) {
	if err := c.begin(ctx, "open"); err != nil {
		return nil, bucket.Info{}, err
	}
	c.s.mu.Lock()
	o, ok := c.s.objects[key]
	c.s.mu.Unlock()
	if !ok {
		return nil, bucket.Info{}, fmt.Errorf("open %s: %w", key, bucket.ErrNotExist)
	}
	data := o.data[min(offset, int64(len(o.data))):]
	if length >= 0 && length < int64(len(data)) {
		data = data[:length]
	}
	return io.NopCloser(bytes.NewReader(data)), info(o), nil
}

// Put implements bucket.Bucket.
func (c *Client) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	started := time.Now()
	if err := c.begin(ctx, "put"); err != nil {
		return bucket.Info{}, err
	}
	data, err := io.ReadAll(io.LimitReader(r, size+1))
	if err != nil {
		return bucket.Info{}, fmt.Errorf("put %s: read body: %w", key, errors.Join(err, bucket.ErrLocal))
	}
	if int64(len(data)) != size {
		return bucket.Info{}, fmt.Errorf("put %s: body of %d bytes, want %d: %w", key, len(data), size, bucket.ErrPermanent)
	}
	// A reset of the connection while the body is sent: the store may or
	// may not have taken the write.
	landsAnyway := false
	if c.s.sem.FaultRate > 0 && c.s.randFloat() < c.s.sem.FaultRate {
		c.s.countFault("reset-mid-body")
		if c.s.randN(2) == 0 {
			return bucket.Info{}, errFault("reset")
		}
		landsAnyway = true
	}
	if err := c.gate(ctx); err != nil { // paused while sending the body
		return bucket.Info{}, err
	}
	if (opts.IfNoneMatch && c.s.sem.IfNoneMatch == "refuse") || (opts.IfMatch != "" && c.s.sem.IfMatch == "refuse") {
		return bucket.Info{}, fmt.Errorf("put %s: 501 NotImplemented: conditional writes: %w", key, bucket.ErrPermanent)
	}
	c.s.mu.Lock()
	old, exists := c.s.objects[key]
	if opts.IfNoneMatch && exists && c.s.sem.IfNoneMatch == "honour" {
		c.s.mu.Unlock()
		return bucket.Info{}, fmt.Errorf("put %s: 412: %w", key, bucket.ErrPrecondition)
	}
	if opts.IfMatch != "" && c.s.sem.IfMatch == "honour" && (!exists || old.etag != opts.IfMatch) {
		c.s.mu.Unlock()
		return bucket.Info{}, fmt.Errorf("put %s: 412: %w", key, bucket.ErrPrecondition)
	}
	if exists && immutable(key) {
		if !bytes.Equal(old.data, data) {
			if c.s.brokenNarinfoLocked(key, old) {
				// A narinfo naming a NAR that is not there (written
				// across a reset) may be replaced: no reader can use it.
				c.s.faults["broken-narinfo-replaced"]++
			} else if c.s.sem.IfNoneMatch != "honour" {
				// A store that ignores or refuses create-only writes
				// cannot be kept from this by any client (two writers
				// that both looked first); counted, not a violation.
				c.s.faults["overwrite-unpreventable"]++
			} else {
				c.s.violations = append(c.s.violations, fmt.Sprintf("%s replaced with other content by %s (if-none-match=%v if-match=%q)", key, c.name, opts.IfNoneMatch, opts.IfMatch))
			}
		} else {
			c.s.replaced++
		}
	}
	c.s.etagSeq++
	sum := md5.Sum(data)
	now := time.Now()
	mod := now.Add(c.s.sem.ClockSkew)
	if c.s.sem.StampAtStart {
		mod = started.Add(c.s.sem.ClockSkew)
	}
	o := &object{data: data, etag: fmt.Sprintf("%s-%d", hex.EncodeToString(sum[:8]), c.s.etagSeq), modified: mod.Truncate(time.Millisecond), visible: now, encoding: opts.ContentEncoding, ctype: opts.ContentType}
	c.s.objects[key] = o
	delete(c.s.deleted, key)
	c.s.note(key, "written by %s (begun %s earlier)", c.name, now.Sub(started).Round(time.Millisecond))
	c.s.mu.Unlock()
	if landsAnyway {
		return bucket.Info{}, errFault("reset")
	}
	return info(o), nil
}

// Delete implements bucket.Bucket.
func (c *Client) Delete(ctx context.Context, key string) error {
	if err := c.begin(ctx, "delete"); err != nil {
		return err
	}
	c.s.mu.Lock()
	if o, ok := c.s.objects[key]; ok {
		c.s.deleted[key] = tombstone{obj: o, deleted: time.Now()}
		delete(c.s.objects, key)
		c.s.note(key, "deleted by %s", c.name)
		if strings.HasPrefix(c.name, "collector") {
			c.s.collected++
		}
	}
	c.s.mu.Unlock()
	return nil
}

// List implements bucket.Bucket, lagging as the semantics say: objects
// visible for less than ListLag are missing, objects deleted less than
// ListLag ago are still there.
func (c *Client) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	if err := c.begin(ctx, "list"); err != nil {
		return err
	}
	c.s.mu.Lock()
	now := time.Now()
	lag := c.s.sem.ListLag
	var out []bucket.Object
	match := func(k string) bool {
		if !strings.HasPrefix(k, opts.Prefix) || (opts.StartAfter != "" && k <= opts.StartAfter) {
			return false
		}
		return opts.Recursive || !strings.Contains(k[len(opts.Prefix):], "/")
	}
	for k, o := range c.s.objects {
		if match(k) && now.Sub(o.visible) >= lag {
			out = append(out, bucket.Object{Key: k, Info: info(o)})
		}
	}
	for k, t := range c.s.deleted {
		if _, live := c.s.objects[k]; !live && match(k) && now.Sub(t.deleted) < lag {
			out = append(out, bucket.Object{Key: k, Info: info(t.obj)})
		}
		if now.Sub(t.deleted) >= lag {
			delete(c.s.deleted, k)
		}
	}
	c.s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	for _, o := range out {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(o); err != nil {
			return err
		}
	}
	return nil
}

var (
	_ bucket.Bucket       = (*Client)(nil)
	_ bucket.Clock        = (*Client)(nil)
	_ bucket.BoundedClock = (*Client)(nil)
)

// multipartUpload is one multipart upload in progress on the server.
type multipartUpload struct {
	key     string
	opts    bucket.PutOptions
	parts   map[int][]byte
	started time.Time
	expires time.Time // the store's lifecycle rule aborts it then
}

// The multipart uploads of the store (under ObjectStore.mu).
type uploads struct {
	byID map[string]*multipartUpload
	seq  int
}

func (s *ObjectStore) upload(id string) (*multipartUpload, error) {
	u := s.mp.byID[id]
	if u == nil {
		return nil, fmt.Errorf("upload %s: NoSuchUpload: %w", id, bucket.ErrNotExist)
	}
	if time.Now().After(u.expires) {
		delete(s.mp.byID, id)
		s.faults["multipart-expired"]++
		return nil, fmt.Errorf("upload %s: NoSuchUpload (expired): %w", id, bucket.ErrNotExist)
	}
	return u, nil
}

// StartMultipart implements bucket.Multipart.
func (c *Client) StartMultipart(ctx context.Context, key string, opts bucket.PutOptions) (string, error) {
	if err := c.begin(ctx, "start-multipart"); err != nil {
		return "", err
	}
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.s.mp.seq++
	id := fmt.Sprintf("upload-%d", c.s.mp.seq)
	c.s.mp.byID[id] = &multipartUpload{key: key, opts: opts, parts: map[int][]byte{}, started: time.Now(),
		expires: time.Now().Add(c.s.sem.MultipartExpiry)}
	return id, nil
}

// ListParts implements bucket.Multipart.
func (c *Client) ListParts(ctx context.Context, key, id string) ([]bucket.Part, error) {
	if err := c.begin(ctx, "list-parts"); err != nil {
		return nil, err
	}
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	u, err := c.s.upload(id)
	if err != nil {
		return nil, err
	}
	var out []bucket.Part
	for n, data := range u.parts {
		sum := md5.Sum(data)
		out = append(out, bucket.Part{Number: n, ETag: hex.EncodeToString(sum[:]), Size: int64(len(data))})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Number < out[j].Number })
	return out, nil
}

// PutPart implements bucket.Multipart.
func (c *Client) PutPart(ctx context.Context, key, id string, n int, r io.Reader, size int64, wantMD5 []byte) (bucket.Part, error) {
	if err := c.begin(ctx, "put-part"); err != nil {
		return bucket.Part{}, err
	}
	data, err := io.ReadAll(io.LimitReader(r, size+1))
	if err != nil {
		return bucket.Part{}, fmt.Errorf("part %d: %w", n, errors.Join(err, bucket.ErrLocal))
	}
	if int64(len(data)) != size {
		return bucket.Part{}, fmt.Errorf("part %d: %d bytes, want %d: %w", n, len(data), size, bucket.ErrPermanent)
	}
	sum := md5.Sum(data)
	if wantMD5 != nil && !bytes.Equal(wantMD5, sum[:]) {
		return bucket.Part{}, fmt.Errorf("part %d: BadDigest: %w", n, bucket.ErrPermanent)
	}
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	u, err := c.s.upload(id)
	if err != nil {
		return bucket.Part{}, err
	}
	u.parts[n] = data
	return bucket.Part{Number: n, ETag: hex.EncodeToString(sum[:]), Size: size}, nil
}

// CompleteMultipart implements bucket.Multipart: the object becomes
// visible at once, whole.
func (c *Client) CompleteMultipart(ctx context.Context, key, id string, parts []bucket.Part) error {
	if err := c.begin(ctx, "complete-multipart"); err != nil {
		return err
	}
	c.s.mu.Lock()
	u, err := c.s.upload(id)
	if err != nil {
		c.s.mu.Unlock()
		return err
	}
	var body []byte
	for _, p := range parts {
		data, ok := u.parts[p.Number]
		if !ok {
			c.s.mu.Unlock()
			return fmt.Errorf("complete %s: InvalidPart %d: %w", key, p.Number, bucket.ErrPermanent)
		}
		body = append(body, data...)
	}
	delete(c.s.mp.byID, id)
	c.s.mu.Unlock()
	_, err = c.Put(context.WithoutCancel(ctx), key, bytes.NewReader(body), int64(len(body)), bucket.PutOptions{ContentType: u.opts.ContentType, ContentEncoding: u.opts.ContentEncoding})
	return err
}

// AbortMultipart implements bucket.Multipart.
func (c *Client) AbortMultipart(ctx context.Context, key, id string) error {
	if err := c.begin(ctx, "abort-multipart"); err != nil {
		return err
	}
	c.s.mu.Lock()
	delete(c.s.mp.byID, id)
	c.s.mu.Unlock()
	return nil
}

// ListUploads implements bucket.Multipart.
func (c *Client) ListUploads(ctx context.Context, prefix string) ([]bucket.Upload, error) {
	if err := c.begin(ctx, "list-uploads"); err != nil {
		return nil, err
	}
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	var out []bucket.Upload
	for id, u := range c.s.mp.byID {
		if strings.HasPrefix(u.key, prefix) && time.Now().Before(u.expires) {
			out = append(out, bucket.Upload{Key: u.key, UploadID: id, Initiated: u.started})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].UploadID < out[j].UploadID })
	return out, nil
}

var _ bucket.Multipart = (*Client)(nil)

// openUploads counts multipart uploads neither completed, aborted nor
// expired: what a store would bill for.
func (s *ObjectStore) openUploads() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, u := range s.mp.byID {
		if time.Now().Before(u.expires) {
			n++
		}
	}
	return n
}
