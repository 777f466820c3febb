// Package httpcache is a bucket.Bucket on an HTTP binary cache, used as Nix
// uses one (http-binary-cache-store): PUT writes an object, GET reads it,
// HEAD asks whether it exists (404, 410 and 403 mean it does not). HTTP has
// no listing request, so List fails with bucket.ErrNoListing and the
// bucket says so up front (bucket.CheckListable): presence is asked key by
// key, and garbage collection and the whole-cache audit refuse.
//
// Any server that stores what is PUT and serves it back works: nginx with
// its DAV module (dav_methods PUT DELETE; create_full_put_path on), Apache
// mod_dav, a cache service's upload endpoint. Conditional writes
// (If-None-Match: *, If-Match) are sent; servers that ignore them are found
// out by bucket.ProbeConditional, and the callers' fallbacks apply. DELETE
// is used by probes and gc tools only, and a server refusing it just
// leaves probe objects behind.
//
// Credentials come from a netrc file (machine, login, password), as Nix
// reads its netrc-file; they are sent as basic authentication over the
// cache's own host only and never logged.
package httpcache

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
)

// Bucket is an HTTP binary cache.
type Bucket struct {
	base   string // scheme://host[:port][/path], no trailing slash
	host   string // the URL's host, credentials are sent to it only
	client *http.Client
	desc   string
	cred   *credential

	retryUntil atomic.Int64 // unix nanoseconds: the latest Retry-After
	onThrottle atomic.Pointer[func()]
}

var (
	_ bucket.Bucket     = (*Bucket)(nil)
	_ bucket.Unlistable = (*Bucket)(nil)
)

// Timeouts of the transport. A request's own deadline comes from its
// context; these bound the steps where a dead server would otherwise hang
// a connection forever.
const (
	dialTimeout           = 10 * time.Second
	tlsHandshakeTimeout   = 10 * time.Second
	responseHeaderTimeout = 2 * time.Minute // after the whole body is sent
	idleConnTimeout       = 90 * time.Second
)

// New returns the bucket of the http(s):// cache c. Credentials come from
// c.NetrcFile, or Nix's default netrc file ($NIX_CONF_DIR/netrc, else
// /etc/nix/netrc) if that exists.
func New(c *cacheurl.Cache) (*Bucket, error) {
	return newBucket(c, nil)
}

func newBucket(c *cacheurl.Cache, adjust func(*http.Transport)) (*Bucket, error) {
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("http cache: %q is not an http(s) URL", c.URL)
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   tlsHandshakeTimeout,
		ResponseHeaderTimeout: responseHeaderTimeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       idleConnTimeout,
		MaxIdleConnsPerHost:   64, // keep-alive for many small concurrent requests
		ForceAttemptHTTP2:     true,
		// Objects are read as stored: a narinfo written with
		// Content-Encoding is decoded by the caller, once.
		DisableCompression: true,
		TLSClientConfig:    &tls.Config{MinVersion: tls.VersionTLS12},
	}
	if c.TLSCertificate != "" {
		keyFile := c.TLSPrivateKey
		if keyFile == "" {
			keyFile = c.TLSCertificate
		}
		cert, err := tls.LoadX509KeyPair(c.TLSCertificate, keyFile)
		if err != nil {
			// The error names the files, never their contents.
			return nil, fmt.Errorf("tls-certificate: %w", err)
		}
		tr.TLSClientConfig.Certificates = []tls.Certificate{cert}
	}
	if adjust != nil {
		adjust(tr)
	}
	b := &Bucket{base: strings.TrimSuffix(c.URL, "/"), host: u.Hostname(), desc: c.String()}
	b.client = &http.Client{Transport: &hintTransport{base: tr, b: b}, CheckRedirect: refuseWriteRedirects}
	netrc := c.NetrcFile
	if netrc == "" {
		netrc = defaultNetrc()
		if _, err := os.Stat(netrc); err != nil {
			netrc = ""
		}
	}
	if netrc != "" {
		if b.cred, err = lookupNetrc(netrc, b.host); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// defaultNetrc is where Nix looks for its netrc-file by default.
func defaultNetrc() string {
	if d := os.Getenv("NIX_CONF_DIR"); d != "" {
		return filepath.Join(d, "netrc")
	}
	return "/etc/nix/netrc"
}

func (b *Bucket) String() string { return b.desc }

// NoListing implements bucket.Unlistable.
func (b *Bucket) NoListing() error {
	return bucket.NoListingError(b.desc, "an HTTP binary cache has no listing request")
}

// OnThrottle sets f to be called whenever the server answers 429 or 503
// (an adaptive request window shrinks on it).
func (b *Bucket) OnThrottle(f func()) { b.onThrottle.Store(&f) }

func (b *Bucket) objectURL(key string) (string, error) {
	if key == "" || strings.HasPrefix(key, "/") || strings.Contains("/"+key+"/", "/../") || strings.Contains("/"+key+"/", "/./") {
		return "", fmt.Errorf("invalid key %q", key)
	}
	parts := strings.Split(key, "/")
	for i, p := range parts {
		parts[i] = url.PathEscape(p)
	}
	return b.base + "/" + strings.Join(parts, "/"), nil
}

func (b *Bucket) newRequest(ctx context.Context, method, key string, body io.Reader) (*http.Request, error) {
	u, err := b.objectURL(key)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, key, err)
	}
	req.Header.Set("User-Agent", "nixspool")
	if b.cred != nil && req.URL.Hostname() == b.host {
		req.SetBasicAuth(b.cred.login, b.cred.password)
	}
	return req, nil
}

// do sends req and classifies a failure to get any answer.
func (b *Bucket) do(req *http.Request, key string) (*http.Response, error) {
	resp, err := b.client.Do(req)
	if err != nil {
		if ctxErr := req.Context().Err(); ctxErr != nil {
			return nil, fmt.Errorf("%s %s: %w", req.Method, key, ctxErr)
		}
		var local *localError
		if errors.As(err, &local) {
			return nil, fmt.Errorf("%s %s: %w: %w", req.Method, key, bucket.ErrLocal, local.err)
		}
		if errors.Is(err, bucket.ErrPermanent) {
			return nil, fmt.Errorf("%s %s: %w", req.Method, key, redact(err)) // a refused redirect
		}
		// No answer at all: connection refused or reset, DNS, TLS, a
		// timeout of the transport.
		return nil, fmt.Errorf("%s %s: %w: %w", req.Method, key, bucket.ErrUnavailable, redact(err))
	}
	return resp, nil
}

// redact drops the URL from a transport error if it carries userinfo
// (it never should: the URL is refused with credentials in it).
func redact(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		if u, perr := url.Parse(ue.URL); perr == nil && u.User != nil {
			u.User = nil
			return &url.Error{Op: ue.Op, URL: u.String(), Err: ue.Err}
		}
	}
	return err
}

// statusError maps an HTTP answer that is not a success to the bucket's
// error kinds. read: the request asked about an object (HEAD, GET), where
// 404, 410 and 403 mean it is not there, as Nix reads them.
func (b *Bucket) statusError(resp *http.Response, key string, read bool) error {
	detail := ""
	if resp.Request != nil && resp.Request.Method != http.MethodHead {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		detail = strings.Join(strings.Fields(string(data)), " ")
		if len(detail) > 200 {
			detail = detail[:200] + "…"
		}
	}
	method := ""
	if resp.Request != nil {
		method = resp.Request.Method + " "
	}
	what := fmt.Sprintf("%s%s: %s", method, key, resp.Status)
	if detail != "" && !strings.HasPrefix(strings.TrimSpace(detail), "<") {
		what += ": " + detail
	}
	code := resp.StatusCode
	switch {
	case read && (code == http.StatusNotFound || code == http.StatusGone || code == http.StatusForbidden):
		return fmt.Errorf("%s: %w", what, bucket.ErrNotExist)
	case code == http.StatusPreconditionFailed:
		return fmt.Errorf("%s: %w", what, bucket.ErrPrecondition)
	case code == http.StatusTooManyRequests:
		return b.withRetryAfter(fmt.Errorf("%s: %w: %w", what, bucket.ErrUnavailable, bucket.ErrThrottled))
	case code == http.StatusNotImplemented:
		return fmt.Errorf("%s: %w", what, bucket.ErrPermanent)
	case code == http.StatusServiceUnavailable:
		return b.withRetryAfter(fmt.Errorf("%s: %w: %w", what, bucket.ErrUnavailable, bucket.ErrThrottled))
	case code >= 500:
		return b.withRetryAfter(fmt.Errorf("%s: %w", what, bucket.ErrUnavailable))
	case code == http.StatusUnauthorized:
		return &bucket.HintError{Err: fmt.Errorf("%s: %w", what, bucket.ErrPermanent), Hint: "the server wants credentials: put a machine " + b.host + " entry with login and password in the netrc file"}
	case code == http.StatusForbidden:
		return &bucket.HintError{Err: fmt.Errorf("%s: %w", what, bucket.ErrPermanent), Hint: "the server refuses this write: check its permissions and the netrc credentials"}
	case code == http.StatusMethodNotAllowed:
		return &bucket.HintError{Err: fmt.Errorf("%s: %w", what, bucket.ErrPermanent), Hint: "the server does not accept this method here (nginx: dav_methods PUT DELETE)"}
	case code == http.StatusConflict:
		return &bucket.HintError{Err: fmt.Errorf("%s: %w", what, bucket.ErrPermanent), Hint: "the server cannot create the key's directory (nginx: create_full_put_path on)"}
	case code == http.StatusRequestEntityTooLarge:
		return &bucket.HintError{Err: fmt.Errorf("%s: %w", what, bucket.ErrPermanent), Hint: "the server limits the size of uploads (nginx: client_max_body_size 0)"}
	case code == http.StatusRequestTimeout:
		return fmt.Errorf("%s: %w", what, bucket.ErrUnavailable)
	case code >= 400:
		return fmt.Errorf("%s: %w", what, bucket.ErrPermanent)
	}
	// 1xx and 3xx that were not followed.
	return fmt.Errorf("%s: unexpected answer", what)
}

func (b *Bucket) withRetryAfter(err error) error {
	if until := b.retryUntil.Load(); until != 0 {
		if d := time.Until(time.Unix(0, until)); d > 0 {
			return &bucket.RetryAfterError{Err: err, After: d}
		}
	}
	return err
}

// infoOf reads an object's info from the headers of an answer about it.
func infoOf(h http.Header, size int64) bucket.Info {
	info := bucket.Info{Size: size, ETag: trimETag(h.Get("ETag")), ContentEncoding: h.Get("Content-Encoding")}
	if t, err := http.ParseTime(h.Get("Last-Modified")); err == nil {
		info.LastModified = t
	}
	return info
}

func trimETag(s string) string {
	return strings.Trim(strings.TrimPrefix(strings.TrimSpace(s), "W/"), `"`)
}

// Stat implements bucket.Bucket (a HEAD).
func (b *Bucket) Stat(ctx context.Context, key string) (bucket.Info, error) {
	req, err := b.newRequest(ctx, http.MethodHead, key, nil)
	if err != nil {
		return bucket.Info{}, err
	}
	resp, err := b.do(req, key)
	if err != nil {
		return bucket.Info{}, err
	}
	defer drain(resp)
	if resp.StatusCode != http.StatusOK {
		return bucket.Info{}, b.statusError(resp, key, true)
	}
	if resp.ContentLength < 0 {
		// Some servers leave the size out of a HEAD (Go's own does for
		// an object with a Content-Encoding): the first byte's
		// Content-Range says it.
		rc, info, err := b.Open(ctx, key, 0, 1)
		if err != nil {
			return bucket.Info{}, err
		}
		rc.Close()
		return info, nil
	}
	return infoOf(resp.Header, resp.ContentLength), nil
}

// Put implements bucket.Bucket (a PUT with Content-Type, and
// Content-Encoding if set, as Nix sends them). The returned Info comes
// from the answer if it carries an ETag and a date, else from a HEAD that follows
// (nginx's DAV module answers without one).
func (b *Bucket) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	body := &sizedReader{r: r, size: size}
	req, err := b.newRequest(ctx, http.MethodPut, key, body)
	if err != nil {
		return bucket.Info{}, err
	}
	if size == 0 {
		req.Body = http.NoBody
	}
	req.ContentLength = size // -1: chunked
	if opts.ContentType != "" {
		req.Header.Set("Content-Type", opts.ContentType)
	}
	if opts.ContentEncoding != "" {
		req.Header.Set("Content-Encoding", opts.ContentEncoding)
	}
	if opts.IfNoneMatch {
		req.Header.Set("If-None-Match", "*")
	}
	if opts.IfMatch != "" {
		req.Header.Set("If-Match", `"`+opts.IfMatch+`"`)
	}
	resp, err := b.do(req, key)
	if err != nil {
		return bucket.Info{}, err
	}
	defer drain(resp)
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return bucket.Info{}, b.statusError(resp, key, false)
	}
	if info := infoOf(resp.Header, size); info.ETag != "" && !info.LastModified.IsZero() && size >= 0 {
		// The answer describes the object (its ETag and date): no HEAD
		// is needed.
		info.ContentEncoding = opts.ContentEncoding
		return info, nil
	}
	info, err := b.Stat(ctx, key)
	if err != nil {
		return bucket.Info{}, fmt.Errorf("PUT %s: look at the object written: %w", key, err)
	}
	if size >= 0 && info.Size != size {
		return bucket.Info{}, fmt.Errorf("PUT %s: the server holds %d bytes, %d were sent: %w", key, info.Size, size, bucket.ErrUnavailable)
	}
	return info, nil
}

// Get implements bucket.Bucket.
func (b *Bucket) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	rc, info, err := b.Open(ctx, key, 0, -1)
	if err != nil {
		return nil, bucket.Info{}, err
	}
	defer rc.Close()
	if info.Size > max {
		return nil, bucket.Info{}, fmt.Errorf("GET %s: larger than %d bytes", key, max)
	}
	data, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return nil, bucket.Info{}, fmt.Errorf("GET %s: %w", key, err)
	}
	if int64(len(data)) > max {
		return nil, bucket.Info{}, fmt.Errorf("GET %s: larger than %d bytes", key, max)
	}
	if info.Size >= 0 && int64(len(data)) != info.Size {
		return nil, bucket.Info{}, fmt.Errorf("GET %s: %d of %d bytes: %w", key, len(data), info.Size, bucket.ErrUnavailable)
	}
	return data, info, nil
}

// Open implements bucket.Bucket (a GET, with a Range for part of the
// object).
func (b *Bucket) Open(ctx context.Context, key string, offset, length int64) (io.ReadCloser, bucket.Info, error) {
	req, err := b.newRequest(ctx, http.MethodGet, key, nil)
	if err != nil {
		return nil, bucket.Info{}, err
	}
	ranged := offset > 0 || length >= 0
	if ranged {
		if length == 0 {
			info, err := b.Stat(ctx, key)
			return io.NopCloser(strings.NewReader("")), info, err
		}
		rng := fmt.Sprintf("bytes=%d-", offset)
		if length > 0 {
			rng += strconv.FormatInt(offset+length-1, 10)
		}
		req.Header.Set("Range", rng)
	}
	resp, err := b.do(req, key)
	if err != nil {
		return nil, bucket.Info{}, err
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		info := infoOf(resp.Header, resp.ContentLength)
		var r io.Reader = resp.Body
		if ranged {
			// The server ignored the Range: skip to the part wanted.
			if _, err := io.CopyN(io.Discard, resp.Body, offset); err != nil {
				drain(resp)
				return nil, bucket.Info{}, fmt.Errorf("GET %s: %w: %w", key, bucket.ErrUnavailable, err)
			}
			if length > 0 {
				r = io.LimitReader(resp.Body, length)
			}
		}
		return &readCloser{Reader: r, Closer: resp.Body}, info, nil
	case resp.StatusCode == http.StatusPartialContent:
		total, err := totalOf(resp.Header.Get("Content-Range"))
		if err != nil {
			drain(resp)
			return nil, bucket.Info{}, fmt.Errorf("GET %s: %w", key, err)
		}
		return resp.Body, infoOf(resp.Header, total), nil
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable:
		drain(resp)
		info, err := b.Stat(ctx, key)
		if err != nil {
			return nil, bucket.Info{}, err
		}
		if offset >= info.Size {
			return io.NopCloser(strings.NewReader("")), info, nil
		}
		return nil, bucket.Info{}, fmt.Errorf("GET %s: range from %d refused for an object of %d bytes", key, offset, info.Size)
	default:
		defer drain(resp)
		return nil, bucket.Info{}, b.statusError(resp, key, true)
	}
}

// totalOf reads the object's size from a Content-Range: bytes a-b/total.
func totalOf(cr string) (int64, error) {
	i := strings.LastIndexByte(cr, '/')
	if !strings.HasPrefix(cr, "bytes ") || i < 0 {
		return 0, fmt.Errorf("unreadable Content-Range %q", cr)
	}
	n, err := strconv.ParseInt(cr[i+1:], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("unreadable Content-Range %q", cr)
	}
	return n, nil
}

// Delete implements bucket.Bucket.
func (b *Bucket) Delete(ctx context.Context, key string) error {
	req, err := b.newRequest(ctx, http.MethodDelete, key, nil)
	if err != nil {
		return err
	}
	resp, err := b.do(req, key)
	if err != nil {
		return err
	}
	defer drain(resp)
	if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone || (resp.StatusCode >= 200 && resp.StatusCode <= 299) {
		return nil
	}
	return b.statusError(resp, key, false)
}

// List implements bucket.Bucket: it always fails, see NoListing.
func (b *Bucket) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	return b.NoListing()
}

type readCloser struct {
	io.Reader
	io.Closer
}

// drain reads what is left of a small answer so the connection can be
// reused, and closes it.
func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// localError marks an error reading the body of a PUT: this machine's
// fault, not the server's.
type localError struct{ err error }

func (e *localError) Error() string { return e.err.Error() }
func (e *localError) Unwrap() error { return e.err }

// sizedReader passes on exactly size bytes of r (any size if size < 0):
// a reader that ends early or goes on longer fails the request, so the
// server never completes a truncated object.
type sizedReader struct {
	r    io.Reader
	size int64
	n    int64
}

func (s *sizedReader) Read(p []byte) (int, error) {
	if s.size >= 0 && s.n >= s.size {
		// Past the end: is there more?
		var one [1]byte
		if n, _ := s.r.Read(one[:]); n > 0 {
			return 0, &localError{fmt.Errorf("the body is longer than the %d bytes announced", s.size)}
		}
		return 0, io.EOF
	}
	if s.size >= 0 && int64(len(p)) > s.size-s.n {
		p = p[:s.size-s.n]
	}
	n, err := s.r.Read(p)
	s.n += int64(n)
	switch {
	case err == io.EOF && s.size >= 0 && s.n < s.size:
		return n, &localError{fmt.Errorf("the body ended after %d of %d bytes", s.n, s.size)}
	case err != nil && err != io.EOF:
		return n, &localError{err}
	}
	return n, err
}

// hintTransport remembers the latest Retry-After the server sent with a
// 429 or 503, and tells the request window about throttling.
type hintTransport struct {
	base http.RoundTripper
	b    *Bucket
}

func (t *hintTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		if d := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); d > 0 {
			t.b.retryUntil.Store(time.Now().Add(d).UnixNano())
		}
		if f := t.b.onThrottle.Load(); f != nil {
			(*f)()
		}
	}
	return resp, nil
}

// parseRetryAfter reads Retry-After: seconds or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return t.Sub(now)
	}
	return 0
}

// refuseWriteRedirects follows redirects of reads only: Go's client would
// turn a redirected PUT into a GET of the new address, which reports a
// missing object (or, if it exists, a success) for a write that never
// happened.
func refuseWriteRedirects(req *http.Request, via []*http.Request) error {
	if m := via[0].Method; m != http.MethodGet && m != http.MethodHead {
		return fmt.Errorf("%s %s was redirected to %s: put the address it names in the cache URL (%w)", m, via[0].URL.Redacted(), req.URL.Redacted(), bucket.ErrPermanent)
	}
	if len(via) >= 10 {
		return errors.New("stopped after 10 redirects")
	}
	return nil
}
