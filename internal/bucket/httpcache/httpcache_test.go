package httpcache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/buckettest"
	"github.com/nixspool/nixspool/internal/testenv"
)

func open(t *testing.T, raw string) *Bucket {
	t.Helper()
	c, err := cacheurl.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	c.NetrcFile = os.DevNull // not the machine's own
	b, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestContractNginx runs the contract suite against nginx's DAV module,
// the server the end-to-end test uploads to: it cannot list, and it
// ignores If-None-Match and If-Match on PUT (the probes find out).
func TestContractNginx(t *testing.T) {
	n := testenv.StartNginx(t)
	b := open(t, n.URL+"/cache")
	buckettest.RunWith(t, b, buckettest.Caps{NoListing: true, IgnoresConditions: true})
	if ok, err := bucket.ProbeConditional(context.Background(), b, "nixspool/probe/"); ok || err != nil {
		t.Fatalf("ProbeConditional on nginx = %v, %v; want false, nil", ok, err)
	}
}

// TestContractConditional runs the contract suite against a server that
// honours conditional PUTs (412 Precondition Failed), as some cache
// services do: create-only and compare-and-swap writes then hold.
func TestContractConditional(t *testing.T) {
	s := httptest.NewServer(newMemServer())
	t.Cleanup(s.Close)
	buckettest.RunWith(t, open(t, s.URL+"/c"), buckettest.Caps{NoListing: true, ContentEncoding: true})
}

// memServer is an in-memory HTTP binary cache: PUT, GET, HEAD and DELETE,
// with If-None-Match: * and If-Match honoured on PUT.
type memServer struct {
	mu   sync.Mutex
	objs map[string]*memObject
}

type memObject struct {
	data     []byte
	etag     string
	modified time.Time
	encoding string
}

func newMemServer() *memServer { return &memServer{objs: map[string]*memObject{}} }

func (m *memServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m.mu.Lock()
	o := m.objs[r.URL.Path]
	m.mu.Unlock()
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		if o == nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("ETag", `"`+o.etag+`"`)
		if o.encoding != "" {
			w.Header().Set("Content-Encoding", o.encoding)
		}
		http.ServeContent(w, r, "", o.modified, bytes.NewReader(o.data))
	case http.MethodPut:
		data, err := io.ReadAll(r.Body)
		if err != nil {
			return // the client went away: nothing is stored
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		cur := m.objs[r.URL.Path]
		if (r.Header.Get("If-None-Match") == "*" && cur != nil) ||
			(r.Header.Get("If-Match") != "" && (cur == nil || r.Header.Get("If-Match") != `"`+cur.etag+`"`)) {
			w.WriteHeader(http.StatusPreconditionFailed)
			return
		}
		sum := sha256.Sum256(append(data, time.Now().String()...))
		o := &memObject{data: data, etag: hex.EncodeToString(sum[:8]), modified: time.Now(), encoding: r.Header.Get("Content-Encoding")}
		m.objs[r.URL.Path] = o
		w.Header().Set("ETag", `"`+o.etag+`"`)
		w.Header().Set("Last-Modified", o.modified.UTC().Format(http.TimeFormat))
		w.WriteHeader(http.StatusCreated)
	case http.MethodDelete:
		m.mu.Lock()
		delete(m.objs, r.URL.Path)
		m.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}

// TestErrorMapping: each answer a server may give maps to the error kind
// the uploader acts on: absent, precondition failed, retry (with the
// server's Retry-After), or give up with a hint.
func TestErrorMapping(t *testing.T) {
	status := map[string]int{}
	var mu sync.Mutex
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		code := status[r.Method+" "+strings.TrimPrefix(r.URL.Path, "/c/")]
		mu.Unlock()
		if code == 0 {
			code = http.StatusNotFound
		}
		if code == http.StatusTooManyRequests || code == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "7")
		}
		w.WriteHeader(code)
	}))
	t.Cleanup(s.Close)
	b := open(t, s.URL+"/c")
	ctx := context.Background()
	set := func(method, key string, code int) {
		mu.Lock()
		status[method+" "+key] = code
		mu.Unlock()
	}
	isRetryAfter := func(err error) bool {
		d, ok := bucket.RetryAfter(err)
		return ok && d > 5*time.Second && d <= 7*time.Second
	}
	for _, c := range []struct {
		method string
		code   int
		check  func(error) bool
		want   string
	}{
		{"HEAD", 404, bucket.IsNotExist, "absent"},
		{"HEAD", 410, bucket.IsNotExist, "absent"},
		{"HEAD", 403, bucket.IsNotExist, "absent (as Nix reads 403)"},
		{"GET", 404, bucket.IsNotExist, "absent"},
		{"PUT", 412, bucket.IsPrecondition, "precondition failed"},
		{"PUT", 500, func(err error) bool { return errors.Is(err, bucket.ErrUnavailable) && !bucket.IsPermanent(err) }, "unavailable"},
		{"PUT", 502, func(err error) bool { return errors.Is(err, bucket.ErrUnavailable) }, "unavailable"},
		{"HEAD", 503, func(err error) bool { return bucket.IsThrottled(err) && isRetryAfter(err) }, "throttled, Retry-After 7s"},
		{"PUT", 429, func(err error) bool { return bucket.IsThrottled(err) && isRetryAfter(err) }, "throttled, Retry-After 7s"},
		{"PUT", 408, func(err error) bool { return errors.Is(err, bucket.ErrUnavailable) }, "unavailable"},
		{"PUT", 403, bucket.IsPermanent, "permanent"},
		{"PUT", 401, func(err error) bool { return bucket.IsPermanent(err) && strings.Contains(err.Error(), "netrc") }, "permanent, naming netrc"},
		{"PUT", 405, func(err error) bool { return bucket.IsPermanent(err) && strings.Contains(err.Error(), "dav_methods") }, "permanent, with a hint"},
		{"PUT", 409, func(err error) bool {
			return bucket.IsPermanent(err) && strings.Contains(err.Error(), "create_full_put_path")
		}, "permanent, with a hint"},
		{"PUT", 413, func(err error) bool {
			return bucket.IsPermanent(err) && strings.Contains(err.Error(), "client_max_body_size")
		}, "permanent, with a hint"},
		{"PUT", 501, bucket.IsPermanent, "permanent"},
		{"PUT", 400, bucket.IsPermanent, "permanent"},
		{"HEAD", 500, func(err error) bool { return errors.Is(err, bucket.ErrUnavailable) && !bucket.IsNotExist(err) }, "unavailable, not absent"},
	} {
		key := fmt.Sprintf("k%d.narinfo", c.code)
		set(c.method, key, c.code)
		var err error
		switch c.method {
		case "HEAD":
			_, err = b.Stat(ctx, key)
		case "GET":
			_, _, err = b.Get(ctx, key, 100)
		case "PUT":
			_, err = b.Put(ctx, key, strings.NewReader("x"), 1, bucket.PutOptions{IfNoneMatch: true})
		}
		if err == nil || !c.check(err) {
			t.Errorf("%s answered %d: error %v, want %s", c.method, c.code, err, c.want)
		}
		set(c.method, key, 0)
	}
	// DELETE of a missing key is not an error.
	if err := b.Delete(ctx, "gone"); err != nil {
		t.Errorf("Delete of a missing key = %v", err)
	}
	// No server at all: unavailable, not permanent.
	dead := open(t, "http://127.0.0.1:1/c")
	if _, err := dead.Stat(ctx, "x.narinfo"); !errors.Is(err, bucket.ErrUnavailable) || bucket.IsNotExist(err) {
		t.Errorf("Stat with no server = %v, want ErrUnavailable", err)
	}
}

// TestKeysAreEscaped: key characters that mean something in a URL (+ = ?)
// reach the server as part of the path.
func TestKeysAreEscaped(t *testing.T) {
	var got []string
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.URL.EscapedPath())
		http.NotFound(w, r)
	}))
	t.Cleanup(s.Close)
	b := open(t, s.URL+"/c/")
	b.Stat(context.Background(), "log/0c6a-gtk+-3.24=x?y_z.drv")
	if len(got) != 1 || got[0] != "/c/log/0c6a-gtk+-3.24=x%3Fy_z.drv" {
		t.Fatalf("requested %q", got)
	}
	for _, k := range []string{"../x", "/etc/passwd", "a/../../x", "", "a/./b"} {
		if _, err := b.Stat(context.Background(), k); err == nil || !strings.Contains(err.Error(), "invalid key") {
			t.Errorf("key %q: %v", k, err)
		}
	}
}

// TestNetrc: credentials of the cache's machine entry are sent as basic
// authentication, and never appear in errors.
func TestNetrc(t *testing.T) {
	var auth []string
	var mu sync.Mutex
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		auth = append(auth, r.Header.Get("Authorization"))
		mu.Unlock()
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(s.Close)
	netrc := filepath.Join(t.TempDir(), "netrc")
	os.WriteFile(netrc, []byte("# caches\nmachine other.example.org login a password b\n\nmachine 127.0.0.1\n  login uploader\n  password s3cr3t-pw\nmacdef init\nsome macro text\n\ndefault login anon password anon\n"), 0o600)
	c, err := cacheurl.Parse(s.URL + "/c")
	if err != nil {
		t.Fatal(err)
	}
	c.NetrcFile = netrc
	b, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.Put(context.Background(), "x.narinfo", strings.NewReader("x"), 1, bucket.PutOptions{})
	if !bucket.IsPermanent(err) || strings.Contains(err.Error(), "s3cr3t") {
		t.Fatalf("Put = %v, want a permanent error without the password", err)
	}
	req, _ := http.NewRequest("GET", "/", nil)
	req.SetBasicAuth("uploader", "s3cr3t-pw")
	if len(auth) != 1 || auth[0] != req.Header.Get("Authorization") {
		t.Fatalf("Authorization sent: %q, want the netrc entry of 127.0.0.1", auth)
	}

	for text, want := range map[string]*credential{
		"default login anon password anon\n":                                          {"anon", "anon"},
		"machine 127.0.0.1 login u password p machine 127.0.0.1 login v password q\n": {"u", "p"},
		"machine elsewhere login u password p\n":                                      nil,
	} {
		os.WriteFile(netrc, []byte(text), 0o600)
		got, err := lookupNetrc(netrc, "127.0.0.1")
		if err != nil || (got == nil) != (want == nil) || (got != nil && *got != *want) {
			t.Errorf("netrc %q: %+v, %v; want %+v", text, got, err, want)
		}
	}
	os.WriteFile(netrc, []byte("machine h login u password topsecret bogus\n"), 0o600)
	if _, err := lookupNetrc(netrc, "h"); err == nil || strings.Contains(err.Error(), "topsecret") {
		t.Errorf("a malformed netrc: %v; want an error that does not quote it", err)
	}
}

// TestNoListing: List is refused without a request, and the bucket says
// so before anything asks.
func TestNoListing(t *testing.T) {
	requests := 0
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { requests++ }))
	t.Cleanup(s.Close)
	b := open(t, s.URL+"/c")
	err := b.List(context.Background(), bucket.ListOptions{}, func(bucket.Object) error { return nil })
	if !errors.Is(err, bucket.ErrNoListing) || !bucket.IsPermanent(err) || requests != 0 {
		t.Fatalf("List = %v after %d requests", err, requests)
	}
	if err := bucket.CheckListable(b); !errors.Is(err, bucket.ErrNoListing) || !strings.Contains(err.Error(), "cannot be listed") {
		t.Fatalf("CheckListable = %v", err)
	}
}

// TestWriteRedirectRefused: a redirected PUT fails permanently with a
// message naming the address to use (Go's client would have turned it into
// a GET); redirected reads are followed.
func TestWriteRedirectRefused(t *testing.T) {
	var methods []string
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		methods = append(methods, r.Method+" "+r.URL.Path)
		if strings.HasPrefix(r.URL.Path, "/old/") {
			http.Redirect(w, r, "/new/"+strings.TrimPrefix(r.URL.Path, "/old/"), http.StatusMovedPermanently)
			return
		}
		w.Header().Set("Content-Length", "5")
		w.Write([]byte("hello"))
	}))
	t.Cleanup(s.Close)
	b := open(t, s.URL+"/old/")
	_, err := b.Put(context.Background(), "x.narinfo", strings.NewReader("hello"), 5, bucket.PutOptions{})
	if err == nil || !bucket.IsPermanent(err) || !strings.Contains(err.Error(), "/new/x.narinfo") {
		t.Fatalf("redirected PUT: %v; want a permanent error naming the new address", err)
	}
	for _, m := range methods {
		if strings.HasPrefix(m, "GET") {
			t.Fatalf("the PUT was followed as %s", m)
		}
	}
	if data, _, err := b.Get(context.Background(), "y", 100); err != nil || string(data) != "hello" {
		t.Fatalf("redirected GET: %q, %v", data, err)
	}
}

// TestPutWithETagNeedsNoHEAD: a server whose answer to a PUT carries an
// ETag costs one request per write; one without (nginx) is asked by HEAD.
func TestPutWithETagNeedsNoHEAD(t *testing.T) {
	for _, withETag := range []bool{true, false} {
		var heads int
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.Method {
			case http.MethodHead:
				heads++
				w.Header().Set("Content-Length", "5")
				w.Header().Set("ETag", `"e1"`)
			case http.MethodPut:
				if withETag {
					w.Header().Set("ETag", `"e1"`)
					w.Header().Set("Last-Modified", time.Now().UTC().Format(http.TimeFormat))
				}
				w.WriteHeader(http.StatusCreated)
			}
		}))
		b := open(t, s.URL+"/c/")
		info, err := b.Put(context.Background(), "x.narinfo", strings.NewReader("hello"), 5, bucket.PutOptions{})
		s.Close()
		want := 1
		if withETag {
			want = 0
		}
		if err != nil || info.ETag != "e1" || info.Size != 5 || heads != want {
			t.Fatalf("ETag in the answer %v: info %+v, err %v, %d HEADs (want %d)", withETag, info, err, heads, want)
		}
	}
}
