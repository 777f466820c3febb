package testenv

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// listen starts a TCP server on 127.0.0.1 running handle for each
// connection, closed at cleanup.
func listen(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); handle(c) }()
		}
	}()
	return l.Addr().String()
}

func echo(c net.Conn) { io.Copy(c, c) }

func TestDelayProxyRoundTrip(t *testing.T) {
	const oneWay = 40 * time.Millisecond
	p := StartDelayProxy(t, listen(t, echo), oneWay, 0)
	c, err := net.Dial("tcp", p.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 5)
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		if _, err := c.Write([]byte("ping\n")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if rtt := time.Since(t0); rtt < 2*oneWay {
			t.Fatalf("round trip %d took %v through a proxy adding %v each way", i, rtt, oneWay)
		}
		if string(buf) != "ping\n" {
			t.Fatalf("echo: got %q", buf)
		}
	}
	// A raw stream is no HTTP: nothing recorded, and it still works.
	if n := len(p.Requests()); n != 0 {
		t.Fatalf("%d HTTP requests recorded on a raw stream", n)
	}
	if p.BytesUp.Load() != 25 || p.BytesDown.Load() != 25 {
		t.Fatalf("bytes up/down: %d/%d, want 25/25", p.BytesUp.Load(), p.BytesDown.Load())
	}
}

// A bulk transfer is not limited to one chunk per round trip: the delay
// adds latency, not a window.
func TestDelayProxyPipelines(t *testing.T) {
	const oneWay = 100 * time.Millisecond
	const size = 8 << 20
	data := make([]byte, size)
	rand.Read(data)
	p := StartDelayProxy(t, listen(t, func(c net.Conn) { c.Write(data) }), oneWay, 0)
	t0 := time.Now()
	c, err := net.Dial("tcp", p.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(t0)
	if !bytes.Equal(got, data) {
		t.Fatalf("received %d bytes, not the %d sent", len(got), len(data))
	}
	if el < oneWay {
		t.Fatalf("8 MiB arrived in %v, less than the one-way delay %v", el, oneWay)
	}
	// One 32 KiB chunk per round trip would take 256 × 200 ms = 51 s.
	if el > 10*time.Second {
		t.Fatalf("8 MiB took %v through a %v proxy: chunks are not pipelined", el, oneWay)
	}
	t.Logf("8 MiB through a %v one-way proxy in %v", oneWay, el)
}

func TestDelayProxyBandwidthCap(t *testing.T) {
	const rate = 4 << 20 // bytes/s
	const size = 2 << 20
	data := make([]byte, size)
	p := StartDelayProxy(t, listen(t, func(c net.Conn) { c.Write(data) }), time.Millisecond, rate)
	t0 := time.Now()
	c, err := net.Dial("tcp", p.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != size {
		t.Fatalf("received %d bytes, %v", n, err)
	}
	el := time.Since(t0)
	// The last chunk may go as soon as the link frees: allow one chunk.
	if min := time.Duration(float64(size-(32<<10)) / rate * float64(time.Second)); el < min {
		t.Fatalf("2 MiB at a 4 MiB/s cap took %v, want at least %v", el, min)
	}
	if el > 10*time.Second {
		t.Fatalf("2 MiB at a 4 MiB/s cap took %v", el)
	}
}

// The proxy records HTTP requests and their answers, including requests
// with Expect: 100-continue, HEADs (answers without bodies) and requests in
// flight at the same time on several connections.
func TestDelayProxyHTTP(t *testing.T) {
	const parallel = 4
	var arrived sync.WaitGroup
	arrived.Add(parallel)
	all := make(chan struct{})
	go func() { arrived.Wait(); close(all) }()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut:
			io.Copy(io.Discard, r.Body)
		case r.Method == http.MethodHead:
			w.WriteHeader(http.StatusNotFound)
		case strings.HasPrefix(r.URL.Path, "/b/wait/"):
			arrived.Done()
			select { // answer once all parallel requests are in flight
			case <-all:
			case <-time.After(20 * time.Second):
				w.WriteHeader(http.StatusGatewayTimeout)
				return
			}
			io.WriteString(w, "done")
		default:
			io.WriteString(w, strings.Repeat("x", 100000))
		}
	})}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	p := StartDelayProxy(t, l.Addr().String(), 10*time.Millisecond, 0)
	client := &http.Client{Transport: &http.Transport{ExpectContinueTimeout: 5 * time.Second, MaxIdleConnsPerHost: parallel}}
	do := func(method, path string, body []byte, expect bool) int {
		t.Helper()
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, _ := http.NewRequest(method, p.URL+path, rd)
		if expect {
			req.Header.Set("Expect", "100-continue")
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	do("PUT", "/b/nar/1.nar.zst", make([]byte, 70000), false)
	do("PUT", "/b/nar/2.nar.zst", make([]byte, 3<<20), true)
	do("HEAD", "/b/x.narinfo", nil, false)
	do("GET", "/b/big", nil, false)
	do("PUT", "/b/x.narinfo", []byte("narinfo"), false)
	do("PUT", "/b/nar/3.nar.zst?partNumber=1&uploadId=u", make([]byte, 10), false)
	var wg sync.WaitGroup
	for i := 0; i < parallel; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s := do("GET", fmt.Sprintf("/b/wait/%d", i), nil, false); s != 200 {
				t.Errorf("parallel GET %d: status %d", i, s)
			}
		}()
	}
	wg.Wait()
	// The proxy parses its copy of the streams on its own time: wait until
	// it has seen every answer.
	Poll(t, 20*time.Second, "the proxy to record every answer", func() bool {
		return len(p.Requests()) == 6+parallel && p.InFlight() == 0
	})

	if n := p.Count("PUT", "/b/nar/"); n != 3 {
		t.Errorf("PUTs under /b/nar/: %d, want 3", n)
	}
	if n := p.Count("PUT", ""); n != 4 {
		t.Errorf("PUTs: %d, want 4", n)
	}
	if n := p.Count("", "/b/wait/"); n != parallel {
		t.Errorf("GETs under /b/wait/: %d, want %d", n, parallel)
	}
	if m := p.MaxInFlight(); m < parallel {
		t.Errorf("max in flight %d, want ≥ %d", m, parallel)
	}
	reqs := p.Requests()
	want := []struct {
		method, path, query string
		body                int64
		status              int
	}{
		{"PUT", "/b/nar/1.nar.zst", "", 70000, 200},
		{"PUT", "/b/nar/2.nar.zst", "", 3 << 20, 200},
		{"HEAD", "/b/x.narinfo", "", 0, 404},
		{"GET", "/b/big", "", 0, 200},
		{"PUT", "/b/x.narinfo", "", 7, 200},
		{"PUT", "/b/nar/3.nar.zst", "partNumber=1&uploadId=u", 10, 200},
	}
	for i, w := range want {
		r := reqs[i]
		if r.Method != w.method || r.Path != w.path || r.Query != w.query || r.BodyBytes != w.body || r.Status != w.status {
			t.Errorf("request %d: %s %s?%s body %d → %d; want %s %s?%s body %d → %d", i, r.Method, r.Path, r.Query, r.BodyBytes, r.Status, w.method, w.path, w.query, w.body, w.status)
		}
		if r.Answered.Sub(r.Sent) < 0 {
			t.Errorf("request %d answered before it was sent", i)
		}
	}
	p.Reset()
	if len(p.Requests()) != 0 || p.Count("PUT", "") != 0 || p.MaxInFlight() != 0 {
		t.Errorf("Reset kept records")
	}
}

// SetDelay takes effect for bytes read afterwards, and Close ends open
// connections.
func TestDelayProxySetDelayAndClose(t *testing.T) {
	p := StartDelayProxy(t, listen(t, echo), 5*time.Second, 0)
	p.SetDelay(0)
	c, err := net.Dial("tcp", p.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	c.Write([]byte("x"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(t0); rtt >= 5*time.Second {
		t.Fatalf("round trip %v after SetDelay(0)", rtt)
	}
	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return with a connection open")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after Close")
	}
}
