package protocol

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDecodeRequest(t *testing.T) {
	good := map[string]string{
		`{"v":1,"op":"enqueue","paths":["/nix/store/x"],"drv":"/nix/store/y.drv"}`: OpEnqueue,
		`{"v":1,"op":"status","future_field":true}`:                                OpStatus,
		`{"v":1,"op":"retry","all":true}`:                                          OpRetry,
		`{"v":1,"op":"drop","id":7}`:                                               OpDrop,
		`{"v":1,"op":"gc","keep_since_ns":0,"grace_ns":1000000000,"dry_run":true}`: OpGC,
		`{"v":1,"op":"pin","name":"r-1","paths":["/nix/store/x"]}`:                 OpPin,
		`{"v":1,"op":"unpin","name":"r-1"}`:                                        OpUnpin,
		`{"v":1,"op":"pins"}`:                                                      OpPins,
	}
	for in, op := range good {
		req, err := DecodeRequest([]byte(in))
		if err != nil || req.Op != op {
			t.Errorf("DecodeRequest(%s) = %+v, %v", in, req, err)
		}
	}
	bad := map[string]string{
		`not json`:                                          "malformed",
		`{"v":2,"op":"status"}`:                             "version",
		`{"op":"status"}`:                                   "version",
		`{"v":1,"op":"rm -rf"}`:                             "unknown operation",
		`{"v":1,"op":"enqueue"}`:                            "no paths",
		`{"v":1,"op":"drop"}`:                               "need an id",
		`{"v":1,"op":"retry"}`:                              "need an id",
		`{"v":1,"op":"status"} {"v":1}`:                     "trailing",
		`{"v":1,"op":"enqueue","paths":"x"}`:                "malformed",
		`{"v":1,"op":"gc","keep_since_ns":1}`:               "positive grace",
		`{"v":1,"op":"gc","grace_ns":1,"keep_since_ns":-1}`: "positive grace",
		`{"v":1,"op":"pin","name":"r-1"}`:                   "a name and one path",
		`{"v":1,"op":"unpin"}`:                              "need a name",
	}
	for in, want := range bad {
		_, err := DecodeRequest([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DecodeRequest(%s) = %v, want error with %q", in, err, want)
		}
	}
}

func TestReadRequestLimits(t *testing.T) {
	if _, err := ReadRequest(strings.NewReader(strings.Repeat("x", MaxRequestSize+10))); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized request: %v", err)
	}
	if _, err := ReadRequest(strings.NewReader(`{"v":1,"op":"status"}`)); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("request without newline: %v", err)
	}
	if _, err := ReadRequest(strings.NewReader("")); err == nil {
		t.Fatal("empty request accepted")
	}
	long := `{"v":1,"op":"push","paths":["` + strings.Repeat("a", 100000) + `"]}` + "\n"
	if req, err := ReadRequest(strings.NewReader(long)); err != nil || len(req.Paths[0]) != 100000 {
		t.Fatalf("long request: %v", err)
	}
}

func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{`{"v":1,"op":"enqueue","paths":["/nix/store/x"]}`, `{"v":1,"op":"status"}`, `{}`, `[`, "\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := ReadRequest(bytes.NewReader(append(b, '\n')))
		if err != nil {
			return
		}
		if req.V != Version {
			t.Fatalf("accepted version %d", req.V)
		}
		if (req.Op == OpEnqueue || req.Op == OpPush) && len(req.Paths) == 0 {
			t.Fatal("accepted an enqueue without paths")
		}
		if _, err := Encode(req); err != nil {
			t.Fatal(err)
		}
	})
}

// TestCallRoundTrip checks the raw-syscall client against a net server.
func TestCallRoundTrip(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			req, err := ReadRequest(c)
			var resp Response
			if err != nil {
				resp.Error = err.Error()
			} else {
				resp = Response{OK: true, Count: len(req.Paths)}
			}
			b, _ := Encode(&resp)
			c.Write(b)
			c.Close()
		}
	}()
	resp, err := Call(sock, &Request{Op: OpEnqueue, Paths: []string{"/a", "/b"}}, time.Second)
	if err != nil || !resp.OK || resp.Count != 2 {
		t.Fatalf("Call = %+v, %v", resp, err)
	}
	_, err = Call(filepath.Join(t.TempDir(), "missing.sock"), &Request{Op: OpStatus}, time.Second)
	var de *DialError
	if !errors.As(err, &de) {
		t.Fatalf("Call to a missing socket = %v, want DialError", err)
	}
}

// TestCallTimeout: a server that accepts but never answers cannot hold the
// client longer than its timeout.
func TestCallTimeout(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			time.Sleep(2 * time.Second)
			c.Close()
		}
	}()
	start := time.Now()
	_, err = Call(sock, &Request{Op: OpStatus}, 200*time.Millisecond)
	if err == nil {
		t.Fatal("Call to a silent server succeeded")
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("Call took %v with a 200ms timeout", el)
	}
}

// TestReadRequestGrowing: a request that fits SmallRequestSize is read
// without asking for room; a longer one asks once, and a refusal ends the
// read with its error.
func TestReadRequestGrowing(t *testing.T) {
	grows := 0
	grow := func() error { grows++; return nil }
	if _, err := ReadRequestGrowing(strings.NewReader(`{"v":1,"op":"status"}`+"\n"), grow); err != nil || grows != 0 {
		t.Fatalf("small request: %v, grow called %d times", err, grows)
	}
	long := `{"v":1,"op":"push","paths":["` + strings.Repeat("a", 3*SmallRequestSize) + `"]}` + "\n"
	if req, err := ReadRequestGrowing(strings.NewReader(long), grow); err != nil || grows != 1 || len(req.Paths[0]) != 3*SmallRequestSize {
		t.Fatalf("long request: %v, grow called %d times", err, grows)
	}
	busy := errors.New("busy")
	if _, err := ReadRequestGrowing(strings.NewReader(long), func() error { return busy }); !errors.Is(err, busy) {
		t.Fatalf("long request refused room: %v", err)
	}
	if !strings.Contains(ErrTooLarge.Error(), "1048576") {
		t.Fatalf("ErrTooLarge does not name the limit: %v", ErrTooLarge)
	}
}

// TestCallReadsRefusalBeforeRequest: a server that answers and closes
// without reading the request (agentd refusing a connection over its
// limit) reaches the caller as that answer, not as a broken pipe, however
// long the request is.
func TestCallReadsRefusalBeforeRequest(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			b, _ := Encode(&Response{Error: "agentd is busy: connection limit reached"})
			c.Write(b)
			c.Close()
		}
	}()
	paths := make([]string, 0, 20000)
	for i := 0; i < cap(paths); i++ {
		paths = append(paths, fmt.Sprintf("/nix/store/%032d-x", i))
	}
	for i := 0; i < 20; i++ {
		resp, err := Call(sock, &Request{Op: OpEnqueue, Paths: paths}, 2*time.Second)
		if err != nil {
			t.Fatalf("call %d: %v, want the refusal", i, err)
		}
		if resp.OK || !strings.Contains(resp.Error, "limit") {
			t.Fatalf("call %d: %+v, want the refusal", i, resp)
		}
	}
}
