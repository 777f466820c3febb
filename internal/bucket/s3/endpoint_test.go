package s3

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/md5"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/uploader"
)

// request is what the capturing server saw of one request.
type request struct {
	Method, Host, Path, Query string
	StorageClass              string
	Length                    int64 // payload bytes (decoded from aws-chunked)
	TLS                       bool
	ClientCert                string
}

// fakeS3 is a small S3 server that records every request. Objects are kept
// by host and path, so it answers whatever addressing style is used;
// keyless requests (on a bucket) are answered as S3 answers them for a
// missing key, so that any check of the bucket itself would fail.
type fakeS3 struct {
	mu      sync.Mutex
	reqs    []request
	objects map[string][]byte
	uploads int
}

func (f *fakeS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	if strings.HasPrefix(r.Header.Get("X-Amz-Content-Sha256"), "STREAMING-") {
		body = decodeAWSChunked(body)
	}
	n := int64(len(body))
	req := request{Method: r.Method, Host: r.Host, Path: r.URL.Path, Query: r.URL.RawQuery, StorageClass: r.Header.Get("X-Amz-Storage-Class"), Length: n, TLS: r.TLS != nil}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		req.ClientCert = r.TLS.PeerCertificates[0].Subject.CommonName
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reqs = append(f.reqs, req)
	id := r.Host + r.URL.Path
	q := r.URL.Query()
	etag := func(b []byte) string { s := md5.Sum(b); return `"` + hex.EncodeToString(s[:]) + `"` }
	notFound := func() {
		w.Header().Set("Content-Type", "application/xml")
		w.WriteHeader(http.StatusNotFound)
		if r.Method != http.MethodHead {
			fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>%s</Key></Error>`, r.URL.Path)
		}
	}
	switch {
	case r.Method == http.MethodPost && q.Has("uploads"):
		f.uploads++
		fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>up-%d</UploadId></InitiateMultipartUploadResult>`, f.uploads)
	case r.Method == http.MethodPut && q.Has("partNumber"):
		w.Header().Set("ETag", etag(body))
	case r.Method == http.MethodPost && q.Has("uploadId"):
		fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><ETag>"x-1"</ETag></CompleteMultipartUploadResult>`)
	case r.Method == http.MethodPut:
		f.objects[id] = body
		w.Header().Set("ETag", etag(body))
	case r.Method == http.MethodHead || r.Method == http.MethodGet:
		b, ok := f.objects[id]
		if !ok {
			notFound()
			return
		}
		w.Header().Set("ETag", etag(b))
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Header().Set("Last-Modified", time.Now().UTC().Format(http.TimeFormat))
		if r.Method == http.MethodGet {
			w.Write(b)
		}
	case r.Method == http.MethodDelete:
		delete(f.objects, id)
		w.WriteHeader(http.StatusNoContent)
	default:
		w.WriteHeader(http.StatusNotImplemented)
	}
}

// decodeAWSChunked undoes the aws-chunked encoding of streaming
// signatures: "<hex size>[;chunk-signature=…]\r\n<data>\r\n", ending with a
// chunk of size 0 (and trailers).
func decodeAWSChunked(b []byte) []byte {
	var out []byte
	for len(b) > 0 {
		line, rest, ok := bytes.Cut(b, []byte("\r\n"))
		if !ok {
			break
		}
		sizeHex, _, _ := bytes.Cut(line, []byte(";"))
		n, err := strconv.ParseInt(string(sizeHex), 16, 64)
		if err != nil || n == 0 || int64(len(rest)) < n {
			break
		}
		out = append(out, rest[:n]...)
		b = bytes.TrimPrefix(rest[n:], []byte("\r\n"))
	}
	return out
}

func (f *fakeS3) requests() []request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]request(nil), f.reqs...)
}

func (f *fakeS3) reset() {
	f.mu.Lock()
	f.reqs = nil
	f.mu.Unlock()
}

// capture starts a fakeS3 over plain HTTP and over TLS.
type capture struct {
	fake       *fakeS3
	plain, tls *httptest.Server
}

func newCapture(t *testing.T, requireClientCert bool) *capture {
	t.Helper()
	c := &capture{fake: &fakeS3{objects: map[string][]byte{}}}
	c.plain = httptest.NewServer(c.fake)
	c.tls = httptest.NewUnstartedServer(c.fake)
	if requireClientCert {
		c.tls.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert}
	}
	c.tls.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are expected
	c.tls.StartTLS()
	t.Cleanup(c.plain.Close)
	t.Cleanup(c.tls.Close)
	return c
}

// bucket opens the cache URL with every connection sent to the capturing
// server, whatever host and port it is for: plain HTTP to the plain
// server, TLS to the TLS one (whose certificate is not checked).
func (c *capture) bucket(t *testing.T, rawURL string) *Bucket {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
	cu, err := cacheurl.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	b, err := newBucket(cu, func(tr *http.Transport) {
		var d net.Dialer
		target := c.plain.Listener.Addr().String()
		if cu.Secure {
			target = c.tls.Listener.Addr().String()
			tr.TLSClientConfig.InsecureSkipVerify = true
		}
		tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, target)
		}
		tr.Proxy = nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// objectRoundTrip puts, stats, reads and deletes one small object, as
// agentd's doctor does.
func objectRoundTrip(t *testing.T, b *Bucket, key string) {
	t.Helper()
	ctx := context.Background()
	body := "StoreDir: /nix/store\n"
	if _, err := b.Put(ctx, key, strings.NewReader(body), int64(len(body)), bucket.PutOptions{ContentType: "text/plain"}); err != nil {
		t.Fatalf("put: %v", err)
	}
	if info, err := b.Stat(ctx, key); err != nil || info.Size != int64(len(body)) {
		t.Fatalf("stat: %+v %v", info, err)
	}
	if data, _, err := b.Get(ctx, key, 1<<10); err != nil || string(data) != body {
		t.Fatalf("get: %q %v", data, err)
	}
	if err := b.Delete(ctx, key); err != nil {
		t.Fatalf("delete: %v", err)
	}
}

// TestEndpointFormsReachTheRightHostAndPath sends requests for each form of
// the cache URL and checks the Host and path every captured request went
// to: what Nix would send for the same URL.
func TestEndpointFormsReachTheRightHostAndPath(t *testing.T) {
	c := newCapture(t, false)
	for _, tc := range []struct {
		url, host, path string
		tls             bool
	}{
		{"s3://bkt?endpoint=minio.test:9000&scheme=http", "minio.test:9000", "/bkt/nix-cache-info", false},
		{"s3://bkt?endpoint=http://minio.test:9000", "minio.test:9000", "/bkt/nix-cache-info", false},
		{"s3://bkt?endpoint=http://127.0.0.1:9000", "127.0.0.1:9000", "/bkt/nix-cache-info", false},
		{"s3://bkt?endpoint=https://minio.test:9443", "minio.test:9443", "/bkt/nix-cache-info", true},
		{"s3://bkt?endpoint=minio.test", "minio.test", "/bkt/nix-cache-info", true},
		{"s3://bkt/pre?endpoint=https://minio.test/", "minio.test", "/bkt/pre/nix-cache-info", true},
		{"s3://bkt?endpoint=https://minio.test&addressing-style=virtual", "bkt.minio.test", "/nix-cache-info", true},
		{"s3://bkt?endpoint=minio.test:9000&scheme=http&addressing-style=virtual", "bkt.minio.test:9000", "/nix-cache-info", false},
		{"s3://bkt?region=eu-west-1", "bkt.s3.eu-west-1.amazonaws.com", "/nix-cache-info", true},
		{"s3://bkt?region=eu-west-1&addressing-style=path", "s3.eu-west-1.amazonaws.com", "/bkt/nix-cache-info", true},
		{"s3://my.bucket?region=eu-west-1", "s3.eu-west-1.amazonaws.com", "/my.bucket/nix-cache-info", true},
		{"s3://bkt", "bkt.s3.us-east-1.amazonaws.com", "/nix-cache-info", true},
		// The two forms of the "Setting up a Nix binary cache" guide.
		{"s3://cache?endpoint=demo-store.ams3.digitaloceanspaces.com", "demo-store.ams3.digitaloceanspaces.com", "/cache/nix-cache-info", true},
		{"s3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com", "s3.eu-central-003.backblazeb2.com", "/demo-store/cache/nix-cache-info", true},
	} {
		t.Run(tc.url, func(t *testing.T) {
			c.fake.reset()
			b := c.bucket(t, tc.url)
			objectRoundTrip(t, b, "nix-cache-info")
			reqs := c.fake.requests()
			if len(reqs) < 4 {
				t.Fatalf("captured %d requests, want at least 4", len(reqs))
			}
			for _, r := range reqs {
				if r.Host != tc.host || r.Path != tc.path || r.TLS != tc.tls {
					t.Errorf("%s went to %s%s (TLS %v), want %s%s (TLS %v)", r.Method, r.Host, r.Path, r.TLS, tc.host, tc.path, tc.tls)
				}
			}
		})
	}
}

// TestStartupChecksWorkWhenTheEndpointNamesTheBucket: with the first form
// of the guide the endpoint itself is the bucket (virtual host), and the
// URL's "bucket" is a key prefix. agentd's start-up check (nix-cache-info,
// written if missing) and doctor's probe must work, which they do because
// neither asks anything of the bucket itself: every request carries a key.
func TestStartupChecksWorkWhenTheEndpointNamesTheBucket(t *testing.T) {
	c := newCapture(t, false)
	url := "s3://cache?endpoint=demo-store.ams3.digitaloceanspaces.com"
	b := c.bucket(t, url)
	cu, _ := cacheurl.Parse(url)
	u, err := uploader.New(uploader.Options{Bucket: b, Cache: cu, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := u.EnsureCacheInfo(context.Background()); err != nil {
		t.Fatalf("agentd's start-up check: %v", err)
	}
	objectRoundTrip(t, b, "nixspool-probe/host-1")
	if err := u.Probe(context.Background()); err != nil {
		t.Fatalf("probe after an outage: %v", err)
	}
	var wrote bool
	for _, r := range c.fake.requests() {
		if r.Host != "demo-store.ams3.digitaloceanspaces.com" || !strings.HasPrefix(r.Path, "/cache/") || r.Path == "/cache/" {
			t.Errorf("%s %s%s?%s is not a request for an object under the prefix", r.Method, r.Host, r.Path, r.Query)
		}
		wrote = wrote || (r.Method == http.MethodPut && r.Path == "/cache/nix-cache-info")
	}
	if !wrote {
		t.Error("nix-cache-info was not written")
	}
}

func TestStorageClassOnEveryUpload(t *testing.T) {
	c := newCapture(t, false)
	b := c.bucket(t, "s3://bkt?endpoint=minio.test&scheme=http&storage-class=STANDARD_IA")
	ctx := context.Background()
	small, large := []byte("narinfo\n"), bytes.Repeat([]byte("n"), 20<<20)
	if _, err := b.Put(ctx, "x.narinfo", bytes.NewReader(small), int64(len(small)), bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Put(ctx, "nar/x.nar", bytes.NewReader(large), int64(len(large)), bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.StartMultipart(ctx, "nar/y.nar", bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	// A storage class the caller names wins.
	if _, err := b.Put(ctx, "z", bytes.NewReader(small), int64(len(small)), bucket.PutOptions{StorageClass: "GLACIER"}); err != nil {
		t.Fatal(err)
	}
	creates := 0
	for _, r := range c.fake.requests() {
		isCreate := (r.Method == http.MethodPut && !strings.Contains(r.Query, "partNumber")) || (r.Method == http.MethodPost && strings.Contains(r.Query, "uploads"))
		if !isCreate {
			continue
		}
		creates++
		want := "STANDARD_IA"
		if r.Path == "/bkt/z" {
			want = "GLACIER"
		}
		if r.StorageClass != want {
			t.Errorf("%s %s?%s: storage class %q, want %q", r.Method, r.Path, r.Query, r.StorageClass, want)
		}
	}
	if creates != 4 {
		t.Errorf("%d object-creating requests, want 4", creates)
	}
	// Without storage-class= no header is sent.
	c.fake.reset()
	b = c.bucket(t, "s3://bkt?endpoint=minio.test&scheme=http")
	objectRoundTrip(t, b, "k")
	for _, r := range c.fake.requests() {
		if r.StorageClass != "" {
			t.Errorf("%s sent storage class %q", r.Method, r.StorageClass)
		}
	}
}

// TestPartSizing: multipart-chunk-size sets the part size,
// multipart-upload=true with multipart-threshold keeps smaller objects in
// one PUT, and by default an object larger than one 16 MiB part goes up in
// parts.
func TestPartSizing(t *testing.T) {
	c := newCapture(t, false)
	obj := bytes.Repeat([]byte("0123456789abcdef"), (20<<20)/16) // 20 MiB
	for _, tc := range []struct {
		query string
		parts []int64 // part sizes; nil: one PUT
	}{
		{"", []int64{16 << 20, 4 << 20}},
		{"&multipart-chunk-size=6M", []int64{6 << 20, 6 << 20, 6 << 20, 2 << 20}},
		{"&buffer-size=8388608", []int64{8 << 20, 8 << 20, 4 << 20}},
		{"&multipart-upload=true&multipart-threshold=32M", nil},
		{"&multipart-upload=true&multipart-threshold=10M&multipart-chunk-size=5M", []int64{5 << 20, 5 << 20, 5 << 20, 5 << 20}},
		{"&multipart-upload=true", nil}, // Nix's 100 MiB threshold
	} {
		t.Run(tc.query, func(t *testing.T) {
			c.fake.reset()
			b := c.bucket(t, "s3://bkt?endpoint=minio.test&scheme=http"+tc.query)
			if _, err := b.Put(context.Background(), "nar/big.nar", bytes.NewReader(obj), int64(len(obj)), bucket.PutOptions{}); err != nil {
				t.Fatal(err)
			}
			var parts []int64
			single := 0
			for _, r := range c.fake.requests() {
				switch {
				case r.Method == http.MethodPut && strings.Contains(r.Query, "partNumber="):
					parts = append(parts, r.Length)
				case r.Method == http.MethodPut:
					single++
					if r.Length != int64(len(obj)) {
						t.Errorf("single PUT of %d bytes", r.Length)
					}
				}
			}
			if tc.parts == nil {
				if single != 1 || len(parts) != 0 {
					t.Fatalf("%d single PUTs and parts %v, want one PUT", single, parts)
				}
				return
			}
			if single != 0 || fmt.Sprint(sortSizes(parts)) != fmt.Sprint(sortSizes(tc.parts)) {
				t.Fatalf("parts %v (and %d single PUTs), want %v", parts, single, tc.parts)
			}
		})
	}
	b := c.bucket(t, "s3://bkt?endpoint=minio.test&multipart-chunk-size=6M")
	if ps := b.PartSize(1 << 20); ps != 6<<20 {
		t.Errorf("PartSize with multipart-chunk-size=6M = %d", ps)
	}
	if ps := b.PartSize(1 << 40); (1<<40+ps-1)/ps > 10000 {
		t.Errorf("PartSize(1 TiB) = %d needs more than 10,000 parts", ps)
	}
}

func sortSizes(s []int64) []int64 {
	out := append([]int64(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] > out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// TestClientCertificate: tls-certificate and tls-private-key are presented
// to an endpoint that requires a client certificate.
func TestClientCertificate(t *testing.T) {
	c := newCapture(t, true)
	certFile, keyFile := writeClientCert(t, "nixspool-test-client")
	b := c.bucket(t, "s3://bkt?endpoint=https://minio.test&tls-certificate="+certFile+"&tls-private-key="+keyFile)
	objectRoundTrip(t, b, "k")
	for _, r := range c.fake.requests() {
		if r.ClientCert != "nixspool-test-client" {
			t.Errorf("%s %s: client certificate %q", r.Method, r.Path, r.ClientCert)
		}
	}
	// Without it the server refuses the connection.
	b = c.bucket(t, "s3://bkt?endpoint=https://minio.test")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := b.Stat(ctx, "k"); err == nil || bucket.IsNotExist(err) {
		t.Errorf("stat without a client certificate = %v, want a connection error", err)
	}
	// An unreadable certificate is a clear error at start.
	cu, _ := cacheurl.Parse("s3://bkt?endpoint=https://minio.test&tls-certificate=/nonexistent/cert.pem")
	if _, err := New(cu); err == nil || !strings.Contains(err.Error(), "tls-certificate") {
		t.Errorf("New with a missing certificate = %v", err)
	}
}

func writeClientCert(t *testing.T, cn string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}
