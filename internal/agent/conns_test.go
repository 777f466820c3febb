package agent

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nixspool/nixspool/protocol"
)

// serveAgent serves a on a socket in a temporary directory until the test
// ends; it returns the socket path and a channel that is closed when serve
// has returned, after recording how many connections were still admitted
// at that moment.
func serveAgent(t *testing.T, a *Agent) (sock string, cancel context.CancelFunc, done <-chan struct{}, activeAtReturn *atomic.Int64) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	a.listener = l
	if a.conns == nil {
		a.conns = newConnLimits(maxConns, maxConnsPerUID, largeRequests)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	activeAtReturn = new(atomic.Int64)
	go func() {
		a.serve(ctx)
		activeAtReturn.Store(int64(a.conns.active()))
		close(served)
	}()
	t.Cleanup(func() {
		cancel()
		l.Close()
		<-served
	})
	return sock, cancel, served, activeAtReturn
}

// TestConnectionFloodBounded: connections that each send 1 MiB without a
// newline hold a bounded amount of memory; those over the connection limit
// get a one-line refusal, as does a legitimate client while the limit is
// reached, and that client is served once the flood goes away.
func TestConnectionFloodBounded(t *testing.T) {
	a := testAgent(t)
	sock, _, _, _ := serveAgent(t, a)

	const flood = 200
	// Just under the maximum: the connections allowed a large request
	// keep waiting for the rest of it.
	junk := []byte(strings.Repeat("x", protocol.MaxRequestSize-1))
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	var (
		mu       sync.Mutex
		conns    []net.Conn
		finished atomic.Int64 // writes that completed or failed
		refused  atomic.Int64
		refusal  atomic.Value
	)
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	for i := 0; i < flood; i++ {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
		go func() {
			c.Write(junk)
			finished.Add(1)
		}()
		go func() {
			resp, err := protocol.ReadResponse(bufio.NewReader(c))
			if err == nil && strings.HasPrefix(resp.Error, "agentd is busy") {
				refusal.Store(resp.Error)
				refused.Add(1)
			}
		}()
	}

	// Refused connections fail their writes; the few allowed a large
	// request complete theirs. Without limits every write completes.
	wantFinished := int64(flood - maxConns + largeRequests)
	deadline := time.Now().Add(8 * time.Second)
	for finished.Load() < wantFinished && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	growth := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	const bound = 48 << 20 // the budget is 8 MiB; generous margin
	t.Logf("heap growth with %d connections sending 1 MiB each: %d MiB", flood, growth>>20)
	if growth > bound {
		t.Fatalf("heap grew by %d MiB with %d connections sending 1 MiB each, want under %d MiB", growth>>20, flood, bound>>20)
	}

	for refused.Load() < flood-maxConns && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := refused.Load(); n != flood-maxConns {
		t.Fatalf("%d connections refused, want %d", n, flood-maxConns)
	}
	msg, _ := refusal.Load().(string)
	if strings.Contains(msg, "\n") || !strings.Contains(msg, "limit") {
		t.Fatalf("refusal %q is not one line naming the limit", msg)
	}

	resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpList}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if resp.OK || !strings.HasPrefix(resp.Error, "agentd is busy") {
		t.Fatalf("a client while the limit is reached got %+v, want a refusal", resp)
	}

	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	deadline = time.Now().Add(10 * time.Second)
	for {
		resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpList}, 5*time.Second)
		if err == nil && resp.OK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not served once the flood went away: %+v, %v", resp, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestConnLimitsPerUID: one uid other than root gets at most perUID
// connections; root counts only towards the total; a released slot is
// free again.
func TestConnLimitsPerUID(t *testing.T) {
	l := newConnLimits(4, 2, 1)
	user := peer{uid: 1000, pid: 42, known: true}
	r1, why := l.admit(user)
	r2, why2 := l.admit(user)
	if why != "" || why2 != "" {
		t.Fatalf("first two connections of a uid refused: %q %q", why, why2)
	}
	if _, why := l.admit(user); !strings.Contains(why, "uid 1000") {
		t.Fatalf("third connection of uid 1000: refusal %q, want one naming the uid", why)
	}
	if _, why := l.admit(peer{uid: 1001, known: true}); why != "" {
		t.Fatalf("another uid refused: %q", why)
	}
	if _, why := l.admit(peer{uid: 0, known: true}); why != "" {
		t.Fatalf("root refused below the total: %q", why)
	}
	if _, why := l.admit(peer{uid: 0, known: true}); !strings.Contains(why, "4 connections") {
		t.Fatalf("connection over the total: refusal %q", why)
	}
	r1()
	r1() // releasing twice frees one slot
	if _, why := l.admit(user); why != "" {
		t.Fatalf("uid refused after a release: %q", why)
	}
	r2()
	if n := l.active(); n != 3 {
		t.Fatalf("active = %d, want 3", n)
	}
}

// TestServeWaitsForHandlers: shutdown (serve returning) waits for the
// requests being handled, here one whose answer the client has not read
// yet.
func TestServeWaitsForHandlers(t *testing.T) {
	a := testAgent(t)
	paths := make([]string, 10000)
	for i := range paths {
		paths[i] = fmt.Sprintf("/nix/store/%032d-%s", i, strings.Repeat("n", 100))
	}
	if _, err := a.queue.Enqueue(paths, "", time.Now()); err != nil {
		t.Fatal(err)
	}
	sock, cancel, done, activeAtReturn := serveAgent(t, a)

	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req, _ := protocol.Encode(&protocol.Request{V: protocol.Version, Op: protocol.OpList})
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	// The answer (megabytes) does not fit the socket buffers: the handler
	// blocks writing it until the client reads. Shutdown begins once the
	// answer has begun to arrive (before, a request not read yet may be
	// answered "stopping" at once).
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := br.Peek(1); err != nil {
		t.Fatalf("no answer began: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if n := a.conns.active(); n != 1 {
		t.Fatalf("%d connections active while the answer is written, want 1", n)
	}
	cancel()
	a.listener.Close()
	select {
	case <-done:
		t.Fatalf("serve returned with %d request(s) still being handled", activeAtReturn.Load())
	case <-time.After(300 * time.Millisecond):
	}
	resp, err := protocol.ReadResponse(br)
	if err != nil || !resp.OK || len(resp.Jobs) != len(paths) {
		t.Fatalf("answer after shutdown began: %v", err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not return once its handlers were done")
	}
	if n := activeAtReturn.Load(); n != 0 {
		t.Fatalf("serve returned with %d request(s) still being handled", n)
	}
}
