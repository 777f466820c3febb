package nixstore

import (
	"context"
	"encoding/hex"
	"errors"
	"net"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/nixspool/nixspool/internal/testenv"
)

// buildGraph builds the test graph and returns its top output.
func buildGraph(t *testing.T, env []string) string {
	t.Helper()
	g := testenv.WriteGraph(t, t.TempDir(), false)
	out := strings.TrimSpace(testenv.Run(t, env, "nix-build", g.File, "--no-out-link"))
	return out[strings.LastIndex(out, "\n")+1:]
}

func checkAgainstCLI(t *testing.T, s *Store, env []string, top string) {
	t.Helper()
	ctx := context.Background()
	info, err := s.QueryPathInfo(ctx, top)
	if err != nil || info == nil {
		t.Fatalf("QueryPathInfo: %v, %v", info, err)
	}
	h, err := nixhash.ParseAny(testenv.Trim([]byte(testenv.Run(t, env, "nix-store", "-q", "--hash", top))), nil)
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(info.NarHash) != hex.EncodeToString(h.Digest()) {
		t.Errorf("NarHash = %x, nix-store says %x", info.NarHash, h.Digest())
	}
	if size := testenv.Trim([]byte(testenv.Run(t, env, "nix-store", "-q", "--size", top))); size != itoa(info.NarSize) {
		t.Errorf("NarSize = %d, nix-store says %s", info.NarSize, size)
	}
	refs := strings.Fields(testenv.Run(t, env, "nix-store", "-q", "--references", top))
	sort.Strings(refs)
	if strings.Join(refs, " ") != strings.Join(info.References, " ") {
		t.Errorf("References = %v, nix-store says %v", info.References, refs)
	}
	if !strings.HasSuffix(info.Deriver, "-top.drv") {
		t.Errorf("Deriver = %q", info.Deriver)
	}

	closure, err := s.Closure(ctx, top)
	if err != nil {
		t.Fatal(err)
	}
	want := testenv.Requisites(t, env, top)
	if len(closure) != len(want) {
		t.Fatalf("closure has %d paths, nix-store says %d", len(closure), len(want))
	}
	seen := map[string]bool{}
	for _, p := range closure {
		for _, r := range p.References {
			if r != p.Path && !seen[r] {
				t.Fatalf("%s comes before its reference %s", p.Path, r)
			}
		}
		seen[p.Path] = true
	}
	if closure[len(closure)-1].Path != top {
		t.Errorf("closure does not end with the top path")
	}

	missing := "/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7q-not-there"
	valid, err := s.QueryValidPaths(ctx, []string{top, missing})
	if err != nil || len(valid) != 1 || valid[0] != top {
		t.Fatalf("QueryValidPaths = %v, %v", valid, err)
	}
	if info, err := s.QueryPathInfo(ctx, missing); err != nil || info != nil {
		t.Fatalf("QueryPathInfo(missing) = %v, %v; want nil, nil", info, err)
	}
	if _, err := s.Closure(ctx, missing); err == nil {
		t.Fatal("Closure of an invalid path succeeded")
	}
	// A request the daemon rejects leaves the connection usable.
	if _, err := s.QueryPathInfo(ctx, "/etc/passwd"); err == nil {
		t.Fatal("QueryPathInfo(/etc/passwd) succeeded")
	}
	if _, err := s.QueryPathInfo(ctx, top); err != nil {
		t.Fatalf("after a daemon error: %v", err)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

func TestStdioWithoutDaemon(t *testing.T) {
	testenv.RequireNix(t)
	env := testenv.NixEnv("")
	top := buildGraph(t, env)
	t.Setenv("NIX_DAEMON_SOCKET_PATH", filepath.Join(t.TempDir(), "no-daemon"))
	s := Open(Options{})
	defer s.Close()
	if !strings.Contains(s.String(), "--stdio") {
		t.Fatalf("store = %s, want nix-daemon --stdio", s)
	}
	checkAgainstCLI(t, s, env, top)
}

func TestDaemonSocket(t *testing.T) {
	testenv.RequireNix(t)
	d := testenv.StartNixDaemon(t, testenv.NixEnv(""))
	env := d.ClientEnv(testenv.NixEnv(""))
	top := buildGraph(t, env)
	t.Setenv("NIX_DAEMON_SOCKET_PATH", d.Socket)
	s := Open(Options{})
	defer s.Close()
	if !strings.Contains(s.String(), d.Socket) {
		t.Fatalf("store = %s, want the daemon socket", s)
	}
	checkAgainstCLI(t, s, env, top)
}

// TestHungDaemonTimesOut: a daemon that accepts a connection and then never
// answers fails the request after the stall timeout instead of blocking a
// worker forever.
func TestHungDaemonTimesOut(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hung.sock")
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
			defer c.Close() // read nothing, answer nothing
		}
	}()
	s := Open(Options{Socket: sock, StallTimeout: 200 * time.Millisecond})
	start := time.Now()
	_, err = s.QueryPathInfo(context.Background(), "/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7q-x")
	if !errors.Is(err, ErrStalled) {
		t.Fatalf("request to a hung daemon = %v, want ErrStalled", err)
	}
	if el := time.Since(start); el > 10*time.Second {
		t.Fatalf("took %v with a 200 ms stall timeout", el)
	}
}

// TestHandshakeHonoursContext: a daemon that accepts a connection and
// never answers the handshake fails the request when its context ends,
// not after the (much longer) stall timeout.
func TestHandshakeHonoursContext(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "hung.sock")
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
			defer c.Close() // read nothing, answer nothing
		}
	}()
	s := Open(Options{Socket: sock, StallTimeout: 20 * time.Second})
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = s.QueryValidPaths(ctx, []string{"/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7q-x"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("request with a 200 ms deadline to a daemon that does not answer the handshake = %v, want the deadline's error", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("took %v with a 200 ms deadline", el)
	}
}

// TestDaemonRestartRetriesPooledConnection: a restart of the Nix daemon
// that leaves the processes serving open connections running (Nix's own
// nix-daemon.service has KillMode=process, and nixos-rebuild restarts it
// so) leaves pooled connections usable. One that kills them too closes the
// pooled connections: the first query on each is retried on a fresh
// connection instead of failing.
func TestDaemonRestartRetriesPooledConnection(t *testing.T) {
	testenv.RequireNix(t)
	d := testenv.StartNixDaemon(t, testenv.NixEnv(""))
	top := testenv.AddTextPath(t, "restart", "r\n")
	ctx := context.Background()
	for _, connections := range []bool{false, true, true} {
		// Two pooled connections, served by the running daemon's processes.
		s := Open(Options{Socket: d.Socket, MaxConns: 2})
		defer s.Close()
		if err := s.with(ctx, func(*conn) error {
			_, err := s.QueryPathInfo(ctx, top)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if n := len(s.idle); n != 2 {
			t.Fatalf("%d pooled connections, want 2", n)
		}
		d.Restart(t, connections)
		if valid, err := s.QueryValidPaths(ctx, []string{top}); err != nil || len(valid) != 1 {
			t.Fatalf("query after a restart of the daemon (connections killed: %v) = %v, %v", connections, valid, err)
		}
		if info, err := s.QueryPathInfo(ctx, top); err != nil || info == nil {
			t.Fatalf("path info after a restart of the daemon (connections killed: %v) = %v, %v", connections, info, err)
		}
	}
}
