package cachegc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
)

// fakeClock is a local clock that only moves when told to, or when
// something sleeps on it (sleeping is instant). Hooks run when time
// passes given instants, so tests can act "during" a collector's grace.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	hooks []clockHook
}

type clockHook struct {
	at time.Time
	fn func()
}

func newFakeClock() *fakeClock {
	// Any fixed instant; the store's clock is offset from it.
	return &fakeClock{now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// at runs fn once the clock has reached t.
func (c *fakeClock) at(t time.Time, fn func()) {
	c.mu.Lock()
	c.hooks = append(c.hooks, clockHook{t, fn})
	c.mu.Unlock()
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	target := c.now.Add(d)
	for {
		// Run due hooks in time order, at their own instants.
		sort.Slice(c.hooks, func(i, j int) bool { return c.hooks[i].at.Before(c.hooks[j].at) })
		if len(c.hooks) == 0 || c.hooks[0].at.After(target) {
			break
		}
		h := c.hooks[0]
		c.hooks = c.hooks[1:]
		if h.at.After(c.now) {
			c.now = h.at
		}
		c.mu.Unlock()
		h.fn()
		c.mu.Lock()
	}
	if target.After(c.now) {
		c.now = target
	}
	c.mu.Unlock()
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.Advance(d)
	return ctx.Err()
}

// memObj is one object of a memBucket.
type memObj struct {
	data []byte
	etag string
	lm   time.Time
	enc  string
	ni   *cachefmt.NarInfo
	bad  bool
}

// parsed returns the object parsed as a narinfo, or nil.
func (o *memObj) parsed() *cachefmt.NarInfo {
	if o.ni == nil && !o.bad {
		var err error
		if o.ni, err = cachefmt.ParseNarInfo(o.data); err != nil {
			o.bad = true
		}
	}
	return o.ni
}

// memBucket is an in-memory S3: ETags change with every write, listings
// carry millisecond LastModified and HEADs whole seconds (as MinIO's do),
// conditional writes are honoured, and the store's clock is the fake
// local clock plus skew. It counts requests per kind and key, and after
// every delete it checks the cache's invariant.
type memBucket struct {
	t     *testing.T
	clock *fakeClock
	skew  time.Duration

	mu      sync.Mutex
	objs    map[string]*memObj
	seq     int
	gets    map[string]int
	lists   int
	puts    int
	deletes int
	// ignoreConditions makes conditional writes unconditional.
	ignoreConditions bool
	// ignoreIfMatch makes writes with IfMatch unconditional (IfNoneMatch
	// is still honoured).
	ignoreIfMatch bool
	// checkWrites checks, at each narinfo write, that its NAR and
	// references exist.
	checkWrites bool
	// violations are invariant breaks seen after deletes.
	violations []string
	// onPut, if set, runs (unlocked) after every Put.
	onPut func(key string)
}

func newMemBucket(t *testing.T, clock *fakeClock) *memBucket {
	return &memBucket{t: t, clock: clock, objs: map[string]*memObj{}, gets: map[string]int{}}
}

func (m *memBucket) String() string { return "mem://test" }

// Now implements bucket.Clock: the store's clock.
func (m *memBucket) Now() time.Time { return m.clock.Now().Add(m.skew) }

func (m *memBucket) Stat(_ context.Context, key string) (bucket.Info, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o := m.objs[key]
	if o == nil {
		return bucket.Info{}, fmt.Errorf("stat %s: %w", key, bucket.ErrNotExist)
	}
	return bucket.Info{Size: int64(len(o.data)), ETag: o.etag, LastModified: o.lm.Truncate(time.Second), ContentEncoding: o.enc}, nil
}

func (m *memBucket) Put(_ context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return bucket.Info{}, err
	}
	m.mu.Lock()
	m.puts++
	cur := m.objs[key]
	if !m.ignoreConditions {
		if opts.IfNoneMatch && cur != nil {
			m.mu.Unlock()
			return bucket.Info{}, fmt.Errorf("put %s: %w", key, bucket.ErrPrecondition)
		}
		if opts.IfMatch != "" && !m.ignoreIfMatch && (cur == nil || cur.etag != opts.IfMatch) {
			m.mu.Unlock()
			return bucket.Info{}, fmt.Errorf("put %s: %w", key, bucket.ErrPrecondition)
		}
	}
	m.seq++
	o := &memObj{data: data, etag: "e" + strconv.Itoa(m.seq), lm: m.Now().Truncate(time.Millisecond), enc: opts.ContentEncoding}
	m.objs[key] = o
	if h := cachefmt.Keys.NarinfoHash(key); h != "" && m.checkWrites {
		if ni := o.parsed(); ni != nil {
			if m.objs[ni.URL] == nil {
				m.violations = append(m.violations, fmt.Sprintf("%s written without its NAR", key))
			}
			for _, r := range ni.References {
				if rh := cachefmt.RefHash(r); rh != h && m.objs[rh+".narinfo"] == nil {
					m.violations = append(m.violations, fmt.Sprintf("%s written without its reference %s", key, r))
				}
			}
		}
	}
	hook := m.onPut
	m.mu.Unlock()
	if hook != nil {
		hook(key)
	}
	return bucket.Info{Size: int64(len(data)), ETag: o.etag}, nil
}

// beginPut starts a write the way file:// (the temp file's mtime, then the
// link) and MinIO (modTime, then the metadata commit) do: LastModified is
// stamped now, by the store's clock, but the object becomes visible to
// reads and listings only when land is called.
func (m *memBucket) beginPut(key, body string) (land func()) {
	stamp := m.Now().Truncate(time.Millisecond)
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.puts++
		m.seq++
		m.objs[key] = &memObj{data: []byte(body), etag: "e" + strconv.Itoa(m.seq), lm: stamp}
	}
}

func (m *memBucket) Get(_ context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gets[key]++
	o := m.objs[key]
	if o == nil {
		return nil, bucket.Info{}, fmt.Errorf("get %s: %w", key, bucket.ErrNotExist)
	}
	return bytes.Clone(o.data), bucket.Info{Size: int64(len(o.data)), ETag: o.etag, LastModified: o.lm.Truncate(time.Second), ContentEncoding: o.enc}, nil
}

func (m *memBucket) Open(ctx context.Context, key string, offset, length int64) (io.ReadCloser, bucket.Info, error) {
	data, info, err := m.Get(ctx, key, 1<<30)
	if err != nil {
		return nil, info, err
	}
	return io.NopCloser(bytes.NewReader(data[offset:])), info, nil
}

func (m *memBucket) Delete(_ context.Context, key string) error {
	m.mu.Lock()
	m.deletes++
	delete(m.objs, key)
	m.checkLocked("delete " + key)
	m.mu.Unlock()
	return nil
}

// DeleteMany implements bucket.BatchDeleter: the keys go one at a time
// (in no useful order), with the invariant checked after each.
func (m *memBucket) DeleteMany(_ context.Context, keys []string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.deletes++
	for i := len(keys) - 1; i >= 0; i-- {
		delete(m.objs, keys[i])
		m.checkLocked("delete " + keys[i])
	}
	return nil
}

func (m *memBucket) List(_ context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	m.mu.Lock()
	m.lists++
	var objs []bucket.Object
	for k, o := range m.objs {
		if strings.HasPrefix(k, opts.Prefix) && k > opts.StartAfter {
			objs = append(objs, bucket.Object{Key: k, Info: bucket.Info{Size: int64(len(o.data)), ETag: o.etag, LastModified: o.lm}})
		}
	}
	m.mu.Unlock()
	sort.Slice(objs, func(i, j int) bool { return objs[i].Key < objs[j].Key })
	for _, o := range objs {
		if err := fn(o); err != nil {
			return err
		}
	}
	return nil
}

// checkLocked records a violation of the invariant: every narinfo's NAR
// exists and every reference has a narinfo.
func (m *memBucket) checkLocked(after string) {
	for k, o := range m.objs {
		h := cachefmt.Keys.NarinfoHash(k)
		if h == "" {
			continue
		}
		ni := o.parsed()
		if ni == nil {
			continue
		}
		if m.objs[ni.URL] == nil {
			m.violations = append(m.violations, fmt.Sprintf("after %s: %s without its NAR %s", after, k, ni.URL))
		}
		for _, r := range ni.References {
			if rh := cachefmt.RefHash(r); rh != h && m.objs[rh+".narinfo"] == nil {
				m.violations = append(m.violations, fmt.Sprintf("after %s: %s without its reference %s", after, k, r))
			}
		}
	}
}

// checkInvariant fails the test if the invariant broke at any instant.
func (m *memBucket) checkInvariant(t *testing.T) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkLocked("the end")
	if len(m.violations) > 0 {
		t.Fatalf("invariant broken:\n%s", strings.Join(m.violations, "\n"))
	}
}

func (m *memBucket) has(key string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.objs[key] != nil
}

func (m *memBucket) keys() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ks []string
	for k := range m.objs {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// narinfoGets counts GETs of narinfos.
func (m *memBucket) narinfoGets() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for k, c := range m.gets {
		if cachefmt.Keys.NarinfoHash(k) != "" {
			n += c
		}
	}
	return n
}

func stringsReader(s string) io.Reader { return strings.NewReader(s) }

// hashOf is a valid store path hash for name.
func hashOf(name string) string {
	sum := sha256.Sum256([]byte(name))
	return nixbase32.EncodeToString(sum[:20])
}

// pathOf is the store path called name.
func pathOf(name string) string { return "/nix/store/" + hashOf(name) + "-" + name }

// narKey is name's NAR key.
func narKey(name string) string {
	sum := sha256.Sum256([]byte("nar " + name))
	return "nar/" + nixbase32.EncodeToString(sum[:]) + ".nar.zst"
}

// narinfoOf renders name's narinfo with the given references (names).
func narinfoOf(name string, refs ...string) string {
	var rs []string
	for _, r := range refs {
		rs = append(rs, hashOf(r)+"-"+r)
	}
	sort.Strings(rs)
	return fmt.Sprintf("StorePath: %s\nURL: %s\nCompression: zstd\nNarHash: sha256:1b3fdi2l3b3sxylmivnpvbnl6r5gbz1lhzzlxrmi95vyfkmiqvqp\nNarSize: 100\nReferences: %s\nDeriver: %s.drv\n",
		pathOf(name), narKey(name), strings.Join(rs, " "), hashOf("drv "+name)+"-"+name)
}

// upload writes name as an agent following the protocol would: the NAR,
// then, if the guard allows, the narinfo. A nil guard writes without
// asking. It writes the listing and build log too.
func upload(ctx context.Context, b bucket.Bucket, g *Watcher, name string, refs ...string) error {
	put := func(key, body string) error {
		_, err := b.Put(ctx, key, strings.NewReader(body), int64(len(body)), bucket.PutOptions{})
		return err
	}
	if err := put(narKey(name), "NAR of "+name); err != nil {
		return err
	}
	put(hashOf(name)+".ls", "{}")
	put("log/"+hashOf("drv "+name)+"-"+name+".drv", "log of "+name)
	if g != nil {
		relied := []string{narKey(name)}
		for _, r := range refs {
			relied = append(relied, hashOf(r)+".narinfo")
		}
		if g.Doomed(hashOf(name) + ".narinfo") {
			relied = append(relied, hashOf(name)+".narinfo")
		}
		if _, err := g.Check(ctx, relied); err != nil {
			return err
		}
	}
	return put(hashOf(name)+".narinfo", narinfoOf(name, refs...))
}

// uploadsBucket is a memBucket with multipart uploads in progress.
type uploadsBucket struct {
	*memBucket
	ups     []bucket.Upload
	aborted []string
}

func (u *uploadsBucket) StartMultipart(context.Context, string, bucket.PutOptions) (string, error) {
	return "", bucket.ErrPermanent
}
func (u *uploadsBucket) ListParts(context.Context, string, string) ([]bucket.Part, error) {
	return nil, bucket.ErrNotExist
}
func (u *uploadsBucket) PutPart(context.Context, string, string, int, io.Reader, int64, []byte) (bucket.Part, error) {
	return bucket.Part{}, bucket.ErrPermanent
}
func (u *uploadsBucket) CompleteMultipart(context.Context, string, string, []bucket.Part) error {
	return bucket.ErrPermanent
}
func (u *uploadsBucket) AbortMultipart(_ context.Context, key, id string) error {
	u.aborted = append(u.aborted, id)
	return nil
}
func (u *uploadsBucket) ListUploads(context.Context, string) ([]bucket.Upload, error) {
	return u.ups, nil
}

// boundedBucket is a memBucket whose estimate of the store's clock is off
// by off and claims to be good to within bound.
type boundedBucket struct {
	*memBucket
	off, bound time.Duration
}

func (b *boundedBucket) Now() time.Time { return b.memBucket.Now().Add(b.off) }

func (b *boundedBucket) NowWithin() (time.Time, time.Duration) { return b.Now(), b.bound }
