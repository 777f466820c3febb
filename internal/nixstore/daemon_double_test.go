package nixstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/wire"
)

// newerDaemon is a scripted Nix daemon speaking the worker protocol of
// a newer Nix than the one installed on these machines (Debian's 2.8): it
// stands in for Nix 2.35 (protocol 1.38 with features) or 2.34 (1.37),
// written from Nix's source (worker-protocol-connection.cc: the server
// handshake; daemon.cc: QueryRealisation). It answers QueryRealisation
// only, with the entries in traces (keyed by the request's bytes).
type newerDaemon struct {
	minor    uint64
	features []string
	traces   map[string][]byte // request bytes after the op → answer bytes
	requests chan []byte
}

func (d *newerDaemon) start(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "daemon.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	d.requests = make(chan []byte, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go d.serve(c)
		}
	}()
	return sock
}

func (d *newerDaemon) serve(c net.Conn) {
	defer c.Close()
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	defer func() { recover() }() // the client hung up
	magic, err := wire.ReadUint64(c)
	must(err)
	if magic != workerMagic1 {
		return
	}
	must(wire.WriteUint64(c, workerMagic2))
	must(wire.WriteUint64(c, 1<<8|d.minor))
	client, err := wire.ReadUint64(c)
	must(err)
	minor := min(client&0xff, d.minor)
	if minor >= 38 {
		n, err := wire.ReadUint64(c)
		must(err)
		for range n {
			_, err := wire.ReadString(c, 1024)
			must(err)
		}
		must(wire.WriteUint64(c, uint64(len(d.features))))
		for _, f := range d.features {
			must(wire.WriteString(c, f))
		}
	}
	_, err = wire.ReadUint64(c) // CPU affinity
	must(err)
	_, err = wire.ReadUint64(c) // reserveSpace
	must(err)
	must(wire.WriteString(c, "2.3x (double)"))
	if minor >= 35 {
		must(wire.WriteUint64(c, 1)) // trusted
	}
	must(wire.WriteUint64(c, stderrLast))
	for {
		op, err := wire.ReadUint64(c)
		if err != nil {
			return
		}
		if op != opQueryRealisation {
			must(wire.WriteUint64(c, stderrError))
			return
		}
		// Read the request: drv path and output (with the feature), or
		// the hash id.
		var req bytes.Buffer
		tee := io.TeeReader(c, &req)
		_, err = wire.ReadString(tee, 1024)
		must(err)
		if minor >= 38 && len(d.features) > 0 {
			_, err = wire.ReadString(tee, 1024)
			must(err)
		}
		d.requests <- req.Bytes()
		must(wire.WriteUint64(c, stderrLast))
		if ans, ok := d.traces[req.String()]; ok {
			must(wire.WriteUint64(c, 1))
			_, err = c.Write(ans)
			must(err)
		} else if minor >= 38 && len(d.features) > 0 {
			must(wire.WriteUint64(c, 0))
		} else {
			must(wire.WriteUint64(c, 0)) // an empty set of realisation documents
		}
	}
}

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "nix-2.35.2", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBuildTraceFromNewerDaemon: against a double of a Nix 2.35 daemon
// (no such Nix installs here), the client negotiates
// realisation-with-path-not-hash, sends the derivation output exactly as
// Nix's own unit-test data has it, and reads Nix's encoded entry.
func TestBuildTraceFromNewerDaemon(t *testing.T) {
	key := readTestdata(t, "drv-output-realisation-with-path-not-hash.bin")[:0x50] // (foo.drv, "baz")
	d := &newerDaemon{
		minor:    38,
		features: []string{"delete-dead-specific-referrers", featureRealisationWithPath},
		traces:   map[string][]byte{string(key): readTestdata(t, "unkeyed-realisation-realisation-with-path-not-hash.bin")},
	}
	s := Open(Options{Socket: d.start(t)})
	defer s.Close()
	ctx := context.Background()
	drv := "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv"
	e, err := s.QueryBuildTrace(ctx, drv, "baz")
	if err != nil {
		t.Fatal(err)
	}
	if got := <-d.requests; !bytes.Equal(got, key) {
		t.Fatalf("request %q, Nix encodes %q", got, key)
	}
	zeros := strings.Repeat("A", 86) + "=="
	if e == nil || e.OutPath != "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo" || strings.Join(e.Signatures, " ") != "asdf:"+zeros+" qwer:"+zeros {
		t.Fatalf("entry = %+v", e)
	}
	if e, err := s.QueryBuildTrace(ctx, drv, "quux"); e != nil || err != nil {
		t.Fatalf("absent entry = %+v, %v", e, err)
	}
	<-d.requests
	// The hash-keyed query is not sent on such a connection.
	if _, err := s.QueryRealisation(ctx, "sha256:"+strings.Repeat("0", 64)+"!out"); !errors.Is(err, ErrKeyedByPath) || !errors.Is(err, ErrRealisationsUnsupported) {
		t.Fatalf("QueryRealisation = %v, want ErrKeyedByPath", err)
	}
}

// TestOlderProtocolsKeepHashKeys: a double of a Nix 2.34 daemon
// (protocol 1.37, no features) gets the hash-keyed query as Nix 2.8 does,
// and QueryBuildTrace refuses without sending anything.
func TestOlderProtocolsKeepHashKeys(t *testing.T) {
	d := &newerDaemon{minor: 37}
	s := Open(Options{Socket: d.start(t)})
	defer s.Close()
	ctx := context.Background()
	id := "sha256:" + strings.Repeat("0", 64) + "!out"
	if r, err := s.QueryRealisation(ctx, id); r != nil || err != nil {
		t.Fatalf("QueryRealisation = %+v, %v", r, err)
	}
	var want bytes.Buffer
	wire.WriteString(&want, id)
	if got := <-d.requests; !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("request %q, want %q", got, want.Bytes())
	}
	if _, err := s.QueryBuildTrace(ctx, "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv", "out"); !errors.Is(err, ErrRealisationsUnsupported) {
		t.Fatalf("QueryBuildTrace = %v", err)
	}
	select {
	case r := <-d.requests:
		t.Fatalf("sent %q", r)
	default:
	}
}
