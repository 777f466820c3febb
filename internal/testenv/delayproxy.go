package testenv

// DelayProxy makes a loopback server look distant: a TCP proxy that holds
// every chunk of bytes for a fixed one-way delay in each direction, so a
// request/response round trip costs 2 × oneWay more, while a connection
// still carries any number of chunks in flight (throughput is not capped at
// one chunk per round trip, as on a real long link). An optional bandwidth
// cap models one shared bottleneck per direction.
//
// Use it in front of MinIO, or in front of a FaultProxy to combine faults
// (throttling, 503s) with distance (StartDelayProxy(t, fp.Endpoint, …)):
//
//	m := testenv.StartMinIO(t)
//	p := testenv.StartDelayProxy(t, m.Endpoint, 50*time.Millisecond, 0) // 100 ms RTT, no cap
//	cache := m.BucketURLVia(p.Endpoint, m.Bucket, "")                   // s3://… through p
//	…
//	p.Count("PUT", "/"+m.Bucket+"/nar/")  // PUT requests whose URL path starts so
//	p.MaxInFlight()                       // most requests awaiting an answer at once
//	p.Requests()                          // each request: method, path, query, body size, status, times
//	p.BytesUp.Load(), p.BytesDown.Load()  // bytes carried each way
//	p.SetDelay(5 * time.Millisecond)      // change the distance mid-test
//	p.SetRate(1 << 20)                    // cap each direction at 1 MiB/s from now on
//	p.Reset()                             // forget the requests and bytes seen so far
//
// Each direction of a connection holds at most Window bytes in transit, as
// a TCP window would; with a bandwidth cap, all connections share one
// bottleneck per direction.
//
// The proxy understands HTTP/1.x on each connection it carries (it parses a
// copy of the byte stream; forwarding never waits for the parser): it
// records every request (method, path, body size, status of the answer,
// when each passed) so tests can count re-sent objects or observe how many
// requests a client keeps in flight. A connection that does not speak HTTP
// is proxied all the same, without records. The times recorded are when the
// request head arrived from the client and when the response head arrived
// from the server, i.e. what a client next to the server would see.
//
// Everything is stopped at test cleanup (or by Close).

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// DelayProxy is a TCP proxy adding latency (and optionally a bandwidth cap).
type DelayProxy struct {
	Endpoint string // 127.0.0.1:PORT
	URL      string // http://127.0.0.1:PORT

	target string
	l      net.Listener
	oneWay atomic.Int64 // nanoseconds
	rate   atomic.Int64 // bytes per second per direction; 0 = no cap
	up     link         // client → server
	down   link         // server → client

	// BytesUp and BytesDown count the bytes carried client → server and
	// server → client.
	BytesUp, BytesDown atomic.Int64

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	nconn    int
	reqs     []*ProxiedRequest
	inFlight int
	closed   bool
	wg       sync.WaitGroup
}

// ProxiedRequest is one HTTP request the proxy carried.
type ProxiedRequest struct {
	Conn      int    // connection number, from 1
	Method    string // GET, PUT, HEAD, …
	Path      string // URL path, e.g. /bucket/nar/….nar.zst
	Query     string // raw query, e.g. partNumber=2&uploadId=…
	BodyBytes int64  // request body bytes (after any chunked decoding)
	Status    int    // status of the final answer; 0 while none has arrived
	// Sent is when the request head reached the proxy from the client,
	// Answered when the answer's head reached it from the server (zero
	// while none has).
	Sent, Answered time.Time
}

// link is one direction's bottleneck: when it is free again.
type link struct {
	mu   sync.Mutex
	free time.Time
}

// due returns when a chunk of n bytes read at now reaches the other side.
func (p *DelayProxy) due(l *link, now time.Time, n int) time.Time {
	d := time.Duration(p.oneWay.Load())
	rate := p.rate.Load()
	if rate <= 0 {
		return now.Add(d)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	start := now
	if l.free.After(start) {
		start = l.free
	}
	l.free = start.Add(time.Duration(float64(n) / float64(rate) * float64(time.Second)))
	return l.free.Add(d)
}

// StartDelayProxy listens on 127.0.0.1 and forwards every connection to
// target (host:port), holding each chunk oneWay in each direction, with at
// most bytesPerSec bytes per second in each direction (0 = no cap). It is
// closed at cleanup.
func StartDelayProxy(t T, target string, oneWay time.Duration, bytesPerSec int64) *DelayProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("delay proxy: %v", err)
	}
	p := &DelayProxy{Endpoint: l.Addr().String(), target: target, l: l, conns: map[net.Conn]struct{}{}}
	p.URL = "http://" + p.Endpoint
	p.oneWay.Store(int64(oneWay))
	p.rate.Store(bytesPerSec)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// SetDelay changes the one-way delay for bytes read from now on.
func (p *DelayProxy) SetDelay(oneWay time.Duration) { p.oneWay.Store(int64(oneWay)) }

// SetRate changes the bandwidth cap per direction (0 = none).
func (p *DelayProxy) SetRate(bytesPerSec int64) { p.rate.Store(bytesPerSec) }

// Close stops accepting, cuts every connection and waits for the proxy's
// goroutines to end.
func (p *DelayProxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.l.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// Requests returns a copy of the requests seen since the start (or Reset).
func (p *DelayProxy) Requests() []ProxiedRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]ProxiedRequest, len(p.reqs))
	for i, r := range p.reqs {
		out[i] = *r
	}
	return out
}

// Count is how many requests with this method (any if "") and a URL path
// starting with pathPrefix the proxy has seen.
func (p *DelayProxy) Count(method, pathPrefix string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, r := range p.reqs {
		if (method == "" || r.Method == method) && strings.HasPrefix(r.Path, pathPrefix) {
			n++
		}
	}
	return n
}

// InFlight is the number of requests now waiting for their answer.
func (p *DelayProxy) InFlight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.inFlight
}

// MaxInFlight is the most recorded requests that waited for an answer at
// the same time, judged by when their bytes passed the proxy (Sent and
// Answered), among the requests seen since the start (or Reset).
func (p *DelayProxy) MaxInFlight() int {
	type event struct {
		at    time.Time
		delta int
	}
	p.mu.Lock()
	ev := make([]event, 0, 2*len(p.reqs))
	for _, r := range p.reqs {
		ev = append(ev, event{r.Sent, 1})
		if !r.Answered.IsZero() {
			ev = append(ev, event{r.Answered, -1})
		}
	}
	p.mu.Unlock()
	// An answer and a request at the same instant do not overlap.
	slices.SortFunc(ev, func(a, b event) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return a.delta - b.delta
	})
	n, most := 0, 0
	for _, e := range ev {
		n += e.delta
		most = max(most, n)
	}
	return most
}

// Reset forgets the requests seen so far and zeroes the byte counters.
func (p *DelayProxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reqs = nil
	p.BytesUp.Store(0)
	p.BytesDown.Store(0)
}

func (p *DelayProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.nconn++
		id := p.nconn
		p.conns[c] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(id, c)
	}
}

// serve carries one connection: dial the target, pump both directions,
// and let an HTTP observer read a copy of each.
func (p *DelayProxy) serve(id int, client net.Conn) {
	defer p.wg.Done()
	server, err := net.Dial("tcp", p.target)
	if err != nil {
		client.Close()
		p.forget(client)
		return
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		client.Close()
		server.Close()
		p.forget(client)
		return
	}
	p.conns[server] = struct{}{}
	p.mu.Unlock()

	obs := newHTTPObserver(p, id)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pump(server, client, &p.up, &p.BytesUp, obs.reqs) }()
	go func() { defer wg.Done(); p.pump(client, server, &p.down, &p.BytesDown, obs.resps) }()
	wg.Wait()
	client.Close()
	server.Close()
	obs.close()
	p.forget(client)
	p.forget(server)
}

func (p *DelayProxy) forget(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

type chunk struct {
	b   []byte
	due time.Time
}

// Window is how many bytes each direction of a connection holds in transit
// at most (like a TCP window): a slow receiver slows the sender.
const Window = 8 << 20

// transit is the bytes of one direction of a connection on their way.
type transit struct {
	mu     sync.Mutex
	cond   *sync.Cond
	q      []chunk
	bytes  int
	closed bool // no more pushes
	failed bool // the receiver is gone: drop everything
}

// push waits for room in the window, then queues c.
func (tr *transit) push(c chunk) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for tr.bytes+len(c.b) > Window && tr.bytes > 0 && !tr.failed {
		tr.cond.Wait()
	}
	if tr.failed {
		return
	}
	tr.q = append(tr.q, c)
	tr.bytes += len(c.b)
	tr.cond.Broadcast()
}

// pop waits for the next chunk; false when the stream ended.
func (tr *transit) pop() (chunk, bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for len(tr.q) == 0 && !tr.closed {
		tr.cond.Wait()
	}
	if len(tr.q) == 0 {
		return chunk{}, false
	}
	c := tr.q[0]
	tr.q[0] = chunk{}
	tr.q = tr.q[1:]
	tr.bytes -= len(c.b)
	tr.cond.Broadcast()
	return c, true
}

func (tr *transit) set(closed, failed bool) {
	tr.mu.Lock()
	tr.closed = tr.closed || closed
	tr.failed = tr.failed || failed
	if tr.failed {
		tr.q, tr.bytes = nil, 0
	}
	tr.cond.Broadcast()
	tr.mu.Unlock()
}

// pump copies src to dst, each chunk delivered at its due time, with at
// most Window bytes in transit. End of stream is passed on as a half close
// after the bytes in transit; any other failure cuts both connections.
func (p *DelayProxy) pump(dst, src net.Conn, l *link, count *atomic.Int64, tap *chunkQueue) {
	tr := &transit{}
	tr.cond = sync.NewCond(&tr.mu)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, ok := tr.pop()
			if !ok {
				return
			}
			if w := time.Until(c.due); w > 0 {
				time.Sleep(w)
			}
			if _, err := dst.Write(c.b); err != nil {
				tr.set(false, true)
				src.Close()
				dst.Close()
				return
			}
		}
	}()
	buf := make([]byte, 32<<10)
	var rerr error
	for {
		n, err := src.Read(buf)
		if n > 0 {
			b := append([]byte(nil), buf[:n]...)
			now := time.Now()
			tr.push(chunk{b: b, due: p.due(l, now, n)})
			count.Add(int64(n))
			tap.push(b, now)
		}
		if err != nil {
			rerr = err
			break
		}
	}
	tr.set(true, false)
	<-done
	if errors.Is(rerr, io.EOF) {
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
			return
		}
	}
	src.Close()
	dst.Close()
}

// chunkQueue is an unbounded queue of byte chunks read as a stream: the
// proxy pushes without ever blocking, the HTTP parser reads.
type chunkQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	chunks []stamped
	cur    []byte
	closed bool
	off    bool // the parser gave up: drop everything
	// at is when the chunk last handed to the reader arrived; read only
	// by the reader. After a message head is parsed, it is the arrival of
	// a chunk holding part of that head.
	at time.Time
}

type stamped struct {
	b  []byte
	at time.Time
}

func newChunkQueue() *chunkQueue {
	q := &chunkQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *chunkQueue) push(b []byte, at time.Time) {
	q.mu.Lock()
	if !q.off && !q.closed {
		q.chunks = append(q.chunks, stamped{b, at})
		q.cond.Signal()
	}
	q.mu.Unlock()
}

func (q *chunkQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// stop discards what is queued and everything pushed later.
func (q *chunkQueue) stop() {
	q.mu.Lock()
	q.off = true
	q.chunks = nil
	q.mu.Unlock()
}

func (q *chunkQueue) Read(p []byte) (int, error) {
	if len(q.cur) == 0 {
		q.mu.Lock()
		for len(q.chunks) == 0 && !q.closed {
			q.cond.Wait()
		}
		if len(q.chunks) == 0 {
			q.mu.Unlock()
			return 0, io.EOF
		}
		q.cur, q.at = q.chunks[0].b, q.chunks[0].at
		q.chunks[0] = stamped{}
		q.chunks = q.chunks[1:]
		q.mu.Unlock()
	}
	n := copy(p, q.cur)
	q.cur = q.cur[n:]
	return n, nil
}

// httpObserver parses a copy of one connection's two streams as HTTP/1.x
// requests and responses, pairing them in order.
type httpObserver struct {
	p       *DelayProxy
	id      int
	reqs    *chunkQueue
	resps   *chunkQueue
	pending chan *ProxiedRequest // requests whose answers have not been read
	wg      sync.WaitGroup
}

func newHTTPObserver(p *DelayProxy, id int) *httpObserver {
	o := &httpObserver{p: p, id: id, reqs: newChunkQueue(), resps: newChunkQueue(), pending: make(chan *ProxiedRequest, 1024)}
	o.wg.Add(2)
	go o.readRequests()
	go o.readResponses()
	return o
}

func (o *httpObserver) close() {
	o.reqs.close()
	o.resps.close()
	o.wg.Wait()
}

func (o *httpObserver) readRequests() {
	defer o.wg.Done()
	defer close(o.pending)
	defer o.reqs.stop()
	br := bufio.NewReader(o.reqs)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		r := &ProxiedRequest{Conn: o.id, Method: req.Method, Path: req.URL.Path, Query: req.URL.RawQuery, Sent: o.reqs.at}
		o.p.mu.Lock()
		o.p.reqs = append(o.p.reqs, r)
		o.p.inFlight++
		o.p.mu.Unlock()
		select {
		case o.pending <- r:
		default: // the server is not answering in order: stop observing
			o.answered(r, 0, time.Now())
			return
		}
		n, err := io.Copy(io.Discard, req.Body)
		o.p.mu.Lock()
		r.BodyBytes = n
		o.p.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (o *httpObserver) readResponses() {
	defer o.wg.Done()
	defer func() {
		o.resps.stop()
		for r := range o.pending { // never answered: no longer in flight
			o.answered(r, 0, time.Now())
		}
	}()
	br := bufio.NewReader(o.resps)
	for r := range o.pending {
		for {
			resp, err := http.ReadResponse(br, &http.Request{Method: r.Method})
			if err != nil {
				o.answered(r, 0, time.Now())
				return
			}
			status := resp.StatusCode
			final := status >= 200 || status == http.StatusSwitchingProtocols
			if final {
				o.answered(r, status, o.resps.at)
			}
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil {
				return
			}
			if final {
				break
			}
		}
	}
}

// answered records r's answer (status 0: none came) and counts it out.
func (o *httpObserver) answered(r *ProxiedRequest, status int, at time.Time) {
	o.p.mu.Lock()
	defer o.p.mu.Unlock()
	if !r.Answered.IsZero() {
		return
	}
	r.Status = status
	r.Answered = at
	o.p.inFlight--
}
