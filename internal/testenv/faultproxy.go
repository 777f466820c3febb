package testenv

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Fault is what FaultProxy does to one request.
type Fault int

// Faults.
const (
	Pass        Fault = iota
	Throttle          // 429 SlowDown with Retry-After: 1
	Unavailable       // 503 ServiceUnavailable
	Reset             // close the connection without an answer
	Truncate          // forward only half of the request body
	Delay             // hold the request for FaultProxy.DelayFor, then pass
)

// FaultProxy is an HTTP proxy in front of an S3 server that injects faults
// chosen by Decide for each request.
type FaultProxy struct {
	URL      string // http://127.0.0.1:PORT
	Endpoint string // 127.0.0.1:PORT
	Decide   func(r *http.Request, n int) Fault
	DelayFor time.Duration

	mu       sync.Mutex
	n        int
	Injected map[Fault]int
	srv      *http.Server

	// PutBytes counts the request body bytes of PUTs as they arrive;
	// PartsDone counts multipart part uploads the server accepted;
	// InFlight is the number of requests being handled.
	PutBytes  atomic.Int64
	PartsDone atomic.Int64
	InFlight  atomic.Int64
	// OnResponse, if set, is called after each forwarded request with the
	// status the server answered.
	OnResponse func(r *http.Request, status int)
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// forward passes r to the server, counting what the S3 client sent.
func (p *FaultProxy) forward(rp http.Handler, w http.ResponseWriter, r *http.Request) {
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	rp.ServeHTTP(rec, r)
	if r.Method == http.MethodPut && r.URL.Query().Get("partNumber") != "" && rec.status == http.StatusOK {
		p.PartsDone.Add(1)
	}
	if p.OnResponse != nil {
		p.OnResponse(r, rec.status)
	}
}

// StartFaultProxy proxies to the server at target (host:port).
func StartFaultProxy(t T, target string) *FaultProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("%v", err)
	}
	p := &FaultProxy{Endpoint: l.Addr().String(), Injected: map[Fault]int{}, DelayFor: 3 * time.Second}
	p.URL = "http://" + p.Endpoint
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: target})
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.InFlight.Add(1)
		defer p.InFlight.Add(-1)
		if r.Method == http.MethodPut && r.ContentLength > 0 {
			p.PutBytes.Add(r.ContentLength)
		}
		p.mu.Lock()
		p.n++
		f := Pass
		if p.Decide != nil {
			f = p.Decide(r, p.n)
		}
		p.Injected[f]++
		p.mu.Unlock()
		switch f {
		case Throttle:
			io.Copy(io.Discard, r.Body)
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`)
		case Unavailable:
			io.Copy(io.Discard, r.Body)
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code><Message>Injected.</Message></Error>`)
		case Reset:
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					if tc, ok := c.(*net.TCPConn); ok {
						tc.SetLinger(0) // RST, not FIN
					}
					c.Close()
				}
			}
		case Truncate:
			body, _ := io.ReadAll(r.Body)
			half := body[:len(body)/2]
			r.Body = io.NopCloser(bytes.NewReader(half))
			r.ContentLength = int64(len(half))
			r.Header.Set("Content-Length", strconv.Itoa(len(half)))
			rp.ServeHTTP(w, r)
		case Delay:
			time.Sleep(p.DelayFor)
			p.forward(rp, w, r)
		default:
			p.forward(rp, w, r)
		}
	})}
	go p.srv.Serve(l)
	t.Cleanup(func() { p.srv.Close() })
	return p
}

// DelayPuts holds every PUT whose URL path contains pathPart for d.
func (p *FaultProxy) DelayPuts(d time.Duration, pathPart string) {
	p.DelayFor = d
	p.Decide = func(r *http.Request, n int) Fault {
		if r.Method == http.MethodPut && strings.Contains(r.URL.Path, pathPart) {
			return Delay
		}
		return Pass
	}
}

// Count returns how often f was injected.
func (p *FaultProxy) Count(f Fault) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.Injected[f]
}

// CacheURLVia is the s3:// address of m's test bucket reached through p.
func (m *MinIO) CacheURLVia(p *FaultProxy) string {
	return strings.Replace(m.CacheURL(""), m.Endpoint, p.Endpoint, 1)
}

// DelayWhile holds every request match accepts for d, until the returned
// switch is turned off (Store(false)).
func (p *FaultProxy) DelayWhile(d time.Duration, match func(*http.Request) bool) *atomic.Bool {
	on := &atomic.Bool{}
	on.Store(true)
	p.DelayFor = d
	p.Decide = func(r *http.Request, n int) Fault {
		if on.Load() && match(r) {
			return Delay
		}
		return Pass
	}
	return on
}

// IsPart matches the uploads of multipart parts.
func IsPart(r *http.Request) bool { return r.URL.Query().Get("partNumber") != "" }

// IsNARPut matches PUTs of NAR objects (whole or in parts).
func IsNARPut(r *http.Request) bool {
	return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/nar/")
}
