// Package nixstore reads store path metadata (validity, NarHash, NarSize,
// references, deriver, signatures, CA) from the local Nix store by speaking
// the Nix daemon's worker protocol.
//
// With a daemon (NixOS, multi-user installs) it connects to the daemon's
// socket, found as Nix finds it (NIX_DAEMON_SOCKET_PATH, else
// /nix/var/nix/daemon-socket/socket). Without one (single-user Nix) it runs
// `nix-daemon --stdio`, which serves the same protocol on a pipe straight
// from the local store, as the user running agentd. Either way one
// long-lived connection answers thousands of queries a second, instead of
// one process exec (~17 ms) per path.
package nixstore

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nix-community/go-nix/pkg/wire"
)

// DefaultDaemonSocket is where a multi-user Nix daemon listens.
const DefaultDaemonSocket = "/nix/var/nix/daemon-socket/socket"

// PathInfo is what the store records about one valid path.
type PathInfo struct {
	Path             string
	Deriver          string // absolute .drv path, "" if unknown
	NarHash          []byte // SHA-256 digest of the NAR
	NarSize          uint64
	References       []string // absolute, sorted, may include Path itself
	RegistrationTime int64
	Ultimate         bool
	Sigs             []string
	CA               string
}

// Store answers metadata queries. Its methods are safe for concurrent use.
type Store struct {
	dial  func(ctx context.Context) (*conn, error)
	where string
	idle  chan *conn
	slots chan struct{}
}

// Options configure Open.
type Options struct {
	// Socket is the daemon socket. Empty: NIX_DAEMON_SOCKET_PATH, else
	// DefaultDaemonSocket; if that does not exist, `nix-daemon --stdio`.
	Socket string
	// NixDaemon is the nix-daemon binary for stdio mode ("nix-daemon" on PATH
	// if empty).
	NixDaemon string
	// MaxConns bounds concurrent connections (default 4).
	MaxConns int
	// StallTimeout bounds how long one read or write on a connection may
	// block: a daemon that stops answering closes the connection with an
	// error instead of stalling a worker forever (default 2 minutes).
	StallTimeout time.Duration
}

// Open prepares a Store; connections are made on first use.
func Open(opts Options) *Store {
	if opts.MaxConns <= 0 {
		opts.MaxConns = 4
	}
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = 2 * time.Minute
	}
	stall := opts.StallTimeout
	s := &Store{idle: make(chan *conn, opts.MaxConns), slots: make(chan struct{}, opts.MaxConns)}
	sock := opts.Socket
	if sock == "" {
		sock = os.Getenv("NIX_DAEMON_SOCKET_PATH")
	}
	if sock == "" {
		sock = DefaultDaemonSocket
	}
	if fi, err := os.Stat(sock); opts.Socket != "" || (err == nil && fi.Mode()&os.ModeSocket != 0) {
		s.where = "daemon socket " + sock
		s.dial = func(ctx context.Context) (*conn, error) {
			c, err := dialUnix(ctx, sock)
			if err != nil {
				return nil, err
			}
			return handshake(ctx, c, c, stall)
		}
	} else {
		bin := opts.NixDaemon
		if bin == "" {
			bin = "nix-daemon"
		}
		s.where = bin + " --stdio"
		s.dial = func(ctx context.Context) (*conn, error) { return dialStdio(ctx, bin, stall) }
	}
	return s
}

// dialUnix connects to a unix stream socket with system calls and returns
// the connection as a file (reads and writes go through the runtime's
// poller; closing it ends a blocked read). Not package net: the hook links
// this package, and net makes every hook binary link the C library (its
// resolver), which costs each hook a millisecond or more of start-up.
func dialUnix(ctx context.Context, path string) (*os.File, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("dial unix %s: socket: %w", path, err)
	}
	sa := &syscall.SockaddrUnix{Name: path}
	for {
		err = syscall.Connect(fd, sa)
		if err == syscall.EINTR {
			continue
		}
		if err != syscall.EAGAIN {
			break
		}
		// The listen backlog is full: try again shortly, until ctx ends.
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(time.Millisecond):
			continue
		}
		break
	}
	if err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("dial unix %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// String says how the store is reached.
func (s *Store) String() string { return s.where }

// Close closes idle connections.
func (s *Store) Close() error {
	for {
		select {
		case c := <-s.idle:
			c.close()
		default:
			return nil
		}
	}
}

// with runs fn on a pooled connection. A connection that saw any error is
// discarded: after some errors (those raised while the daemon still parses
// a request) the daemon closes the connection, and the protocol gives no
// way to tell which. fn must be an idempotent query: when the daemon
// closed a pooled connection before answering (its process was killed, or
// the daemon restarted with the processes serving connections), fn runs
// once more on a fresh connection.
func (s *Store) with(ctx context.Context, fn func(c *conn) error) error {
	c, pooled, err := s.acquire(ctx)
	if err != nil {
		return err
	}
	before := c.received
	err = s.run(ctx, c, fn)
	if err == nil || !pooled || c.received != before || !closedByDaemon(err) || ctx.Err() != nil {
		return err
	}
	if c, err = s.fresh(ctx); err != nil {
		return err
	}
	return s.run(ctx, c, fn)
}

// acquire returns an idle connection (pooled) or a new one within the
// bound on connections.
func (s *Store) acquire(ctx context.Context) (c *conn, pooled bool, err error) {
	select {
	case c = <-s.idle:
		return c, true, nil
	default:
	}
	select {
	case c = <-s.idle:
		return c, true, nil
	case s.slots <- struct{}{}:
		c, err = s.connect(ctx)
		return c, false, err
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
}

// fresh returns a new connection, in a free slot or in the slot of an idle
// connection it closes (that one may have been closed by the daemon too).
func (s *Store) fresh(ctx context.Context) (*conn, error) {
	select {
	case s.slots <- struct{}{}:
	case c := <-s.idle:
		c.close() // its slot is taken over
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.connect(ctx)
}

// connect dials in a slot already taken; the slot is released if that
// fails.
func (s *Store) connect(ctx context.Context) (*conn, error) {
	c, err := s.dial(ctx)
	if err != nil {
		<-s.slots
		return nil, fmt.Errorf("connect to nix store via %s: %w", s.where, err)
	}
	return c, nil
}

// run runs fn on c, then pools c, or closes it if anything failed.
func (s *Store) run(ctx context.Context, c *conn, fn func(c *conn) error) error {
	// The protocol has no cancellation; closing the connection unblocks it.
	stop := context.AfterFunc(ctx, c.close)
	err := fn(c)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		c.close()
		<-s.slots
		return err
	}
	s.idle <- c
	return nil
}

// closedByDaemon reports whether err is the daemon's side of the
// connection going away: end of file, a broken pipe or a reset.
func closedByDaemon(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

// QueryPathInfo returns the metadata of p, or nil if p is not valid.
func (s *Store) QueryPathInfo(ctx context.Context, p string) (*PathInfo, error) {
	var info *PathInfo
	err := s.with(ctx, func(c *conn) (err error) {
		info, err = c.queryPathInfo(p)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("query path info %s: %w", p, err)
	}
	return info, nil
}

// QueryValidPaths returns the subset of paths that are valid in the store.
func (s *Store) QueryValidPaths(ctx context.Context, paths []string) ([]string, error) {
	var valid []string
	err := s.with(ctx, func(c *conn) (err error) {
		valid, err = c.queryValidPaths(paths)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("query valid paths: %w", err)
	}
	return valid, nil
}

// QueryReferrers returns the valid store paths that refer to p (the
// reverse of p's references).
func (s *Store) QueryReferrers(ctx context.Context, p string) ([]string, error) {
	var out []string
	err := s.with(ctx, func(c *conn) (err error) {
		if err := c.send(opQueryReferrers, p); err != nil {
			return err
		}
		out, err = c.readStrings()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("query referrers of %s: %w", p, err)
	}
	return out, nil
}

// QueryDerivationOutputMap returns the output paths of the derivation at
// drv by output name; an output not built (or not realised) maps to "".
// This is how floating content-addressed outputs are found.
func (s *Store) QueryDerivationOutputMap(ctx context.Context, drv string) (map[string]string, error) {
	out := map[string]string{}
	err := s.with(ctx, func(c *conn) error {
		if err := c.send(opQueryDerivationOutputMap, drv); err != nil {
			return err
		}
		n, err := wire.ReadUint64(c.r)
		if err != nil {
			return err
		}
		if n > maxList {
			return fmt.Errorf("output map of %d entries is too long", n)
		}
		for i := uint64(0); i < n; i++ {
			name, err := wire.ReadString(c.r, maxString)
			if err != nil {
				return err
			}
			p, err := wire.ReadString(c.r, maxString)
			if err != nil {
				return err
			}
			out[name] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("query outputs of %s: %w", drv, err)
	}
	return out, nil
}

// Closure returns the metadata of p and of everything it references,
// recursively, ordered so that every path comes after its references.
func (s *Store) Closure(ctx context.Context, p string) ([]*PathInfo, error) {
	var out []*PathInfo
	err := s.with(ctx, func(c *conn) error {
		infos := map[string]*PathInfo{}
		queue := []string{p}
		for len(queue) > 0 {
			cur := queue[0]
			queue = queue[1:]
			if _, ok := infos[cur]; ok {
				continue
			}
			info, err := c.queryPathInfo(cur)
			if err != nil {
				return err
			}
			if info == nil {
				return &InvalidPathError{Path: cur}
			}
			infos[cur] = info
			for _, r := range info.References {
				if _, ok := infos[r]; !ok && r != cur {
					queue = append(queue, r)
				}
			}
		}
		out = TopoSort(infos)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("closure of %s: %w", p, err)
	}
	return out, nil
}

// InvalidPathError reports a path that is not (or no longer) valid in the
// store.
type InvalidPathError struct{ Path string }

func (e *InvalidPathError) Error() string {
	return fmt.Sprintf("path %s is not valid in the Nix store (never built, or garbage-collected)", e.Path)
}

// ClosureIn returns p's closure within infos (every path's metadata by
// path), dependencies first; a path infos lacks is an InvalidPathError.
// Stand-ins for a store in tests use it.
func ClosureIn(infos map[string]*PathInfo, p string) ([]*PathInfo, error) {
	sub := map[string]*PathInfo{}
	var walk func(string) error
	walk = func(q string) error {
		info, ok := infos[q]
		if !ok {
			return &InvalidPathError{Path: q}
		}
		if _, seen := sub[q]; seen {
			return nil
		}
		sub[q] = info
		for _, r := range info.References {
			if r != q {
				if err := walk(r); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(p); err != nil {
		return nil, err
	}
	return TopoSort(sub), nil
}

// TopoSort orders infos so that each path follows all of its references
// (self-references ignored); ties are broken by path for determinism.
func TopoSort(infos map[string]*PathInfo) []*PathInfo {
	keys := make([]string, 0, len(infos))
	for k := range infos {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	done := map[string]bool{}
	var out []*PathInfo
	var visit func(string)
	visit = func(p string) {
		if done[p] {
			return
		}
		done[p] = true
		for _, r := range infos[p].References {
			if _, ok := infos[r]; ok && r != p {
				visit(r)
			}
		}
		out = append(out, infos[p])
	}
	for _, k := range keys {
		visit(k)
	}
	return out
}

// Protocol constants of the Nix daemon's worker protocol
// (src/libstore/worker-protocol.hh in Nix's source).
const (
	workerMagic1 = 0x6e697863
	workerMagic2 = 0x6478696f
	// clientVersion 1.38: Nix 2.35's, the first with protocol features. An
	// older daemon downgrades to its own (2.8: 1.34); nothing this client
	// sends or reads changed between 1.34 and 1.38 except the handshake
	// (1.35: the daemon says whether it trusts us; 1.38: features).
	clientVersion = 1<<8 | 38

	// featureRealisationWithPath: realisations ("build trace entries")
	// are keyed by derivation path and output name, not by the hash
	// modulo; a Nix 2.35 daemon answers realisation queries only with it.
	featureRealisationWithPath = "realisation-with-path-not-hash"

	opIsValidPath              = 1
	opQueryReferrers           = 6
	opQueryPathInfo            = 26
	opQueryValidPaths          = 31
	opQueryDerivationOutputMap = 41
	opQueryRealisation         = 43

	stderrNext          = 0x6f6c6d67
	stderrRead          = 0x64617461
	stderrWrite         = 0x64617416
	stderrLast          = 0x616c7473
	stderrError         = 0x63787470
	stderrStartActivity = 0x53545254
	stderrStopActivity  = 0x53544f50
	stderrResult        = 0x52534c54

	maxString = 1 << 20
	maxList   = 1 << 20
)

type conn struct {
	r       *bufio.Reader
	w       *bufio.Writer
	closer  io.Closer
	version uint64 // negotiated
	// features: the protocol features both sides offered (1.38+).
	features map[string]bool
	once     sync.Once
	// received counts the bytes read from the daemon.
	received int64
}

func (c *conn) close() { c.once.Do(func() { c.closer.Close() }) }

// handshake opens the protocol on a new connection. The connection is
// closed if ctx ends first.
func handshake(ctx context.Context, rw io.ReadWriter, closer io.Closer, stall time.Duration) (*conn, error) {
	c := &conn{closer: closer}
	sg := &stallGuard{rw: rw, timeout: stall, onStall: c.close, received: &c.received}
	c.r, c.w = bufio.NewReaderSize(sg, 64<<10), bufio.NewWriter(sg)
	stop := context.AfterFunc(ctx, c.close)
	fail := func(err error) (*conn, error) {
		c.close()
		if !stop() {
			err = errors.Join(ctx.Err(), err)
		}
		return nil, fmt.Errorf("handshake: %w", err)
	}
	if err := wire.WriteUint64(c.w, workerMagic1); err != nil {
		return fail(err)
	}
	if err := c.w.Flush(); err != nil {
		return fail(err)
	}
	magic, err := wire.ReadUint64(c.r)
	if err != nil {
		return fail(err)
	}
	if magic != workerMagic2 {
		return fail(fmt.Errorf("not a Nix daemon (magic %#x)", magic))
	}
	daemonVersion, err := wire.ReadUint64(c.r)
	if err != nil {
		return fail(err)
	}
	if daemonVersion>>8 != 1 || daemonVersion&0xff < 21 {
		return fail(fmt.Errorf("unsupported daemon protocol %d.%d", daemonVersion>>8, daemonVersion&0xff))
	}
	c.version = min(daemonVersion, clientVersion)
	if err := wire.WriteUint64(c.w, clientVersion); err != nil {
		return fail(err)
	}
	if c.minor() >= 38 {
		// Both sides send the features they offer (ours first); the
		// connection has those in both lists.
		if err := writeStrings(c.w, []string{featureRealisationWithPath}); err != nil {
			return fail(err)
		}
		if err := c.w.Flush(); err != nil {
			return fail(err)
		}
		theirs, err := c.readStrings()
		if err != nil {
			return fail(err)
		}
		c.features = map[string]bool{}
		for _, f := range theirs {
			if f == featureRealisationWithPath {
				c.features[f] = true
			}
		}
	}
	for _, v := range []uint64{0 /* CPU affinity (obsolete) */, 0 /* reserveSpace (obsolete) */} {
		if err := wire.WriteUint64(c.w, v); err != nil {
			return fail(err)
		}
	}
	if err := c.w.Flush(); err != nil {
		return fail(err)
	}
	if c.minor() >= 33 {
		if _, err := wire.ReadString(c.r, maxString); err != nil { // the daemon's Nix version
			return fail(err)
		}
	}
	if c.minor() >= 35 {
		// Whether the daemon trusts us: 0 unknown, 1 yes, 2 no.
		if _, err := wire.ReadUint64(c.r); err != nil {
			return fail(err)
		}
	}
	if err := c.processStderr(); err != nil {
		return fail(err)
	}
	if !stop() {
		return fail(errors.New("cancelled"))
	}
	return c, nil
}

func (c *conn) minor() uint64 { return c.version & 0xff }

// DaemonError is an error the daemon reported for a request.
type DaemonError struct{ Msg string }

func (e *DaemonError) Error() string { return "nix daemon: " + stripANSI(e.Msg) }

// stripANSI removes the terminal colour codes Nix puts in its messages.
func stripANSI(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == 0x1b && i+1 < len(s) && s[i+1] == '[' {
			j := i + 2
			for j < len(s) && (s[j] < 0x40 || s[j] > 0x7e) {
				j++
			}
			i = j
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// processStderr consumes the daemon's log frames up to STDERR_LAST.
func (c *conn) processStderr() error {
	for {
		msg, err := wire.ReadUint64(c.r)
		if err != nil {
			return err
		}
		switch msg {
		case stderrLast:
			return nil
		case stderrNext, stderrWrite:
			if _, err := wire.ReadString(c.r, maxString); err != nil {
				return err
			}
		case stderrRead:
			return errors.New("daemon asked for data; not supported")
		case stderrError:
			return c.readError()
		case stderrStartActivity:
			if err := c.skipUints(3); err != nil { // id, level, type
				return err
			}
			if _, err := wire.ReadString(c.r, maxString); err != nil {
				return err
			}
			if err := c.skipFields(); err != nil {
				return err
			}
			if err := c.skipUints(1); err != nil { // parent
				return err
			}
		case stderrStopActivity:
			if err := c.skipUints(1); err != nil {
				return err
			}
		case stderrResult:
			if err := c.skipUints(2); err != nil { // id, type
				return err
			}
			if err := c.skipFields(); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown daemon message %#x", msg)
		}
	}
}

func (c *conn) readError() error {
	if c.minor() < 26 {
		msg, err := wire.ReadString(c.r, maxString)
		if err != nil {
			return err
		}
		if err := c.skipUints(1); err != nil {
			return err
		}
		return &DaemonError{Msg: msg}
	}
	if _, err := wire.ReadString(c.r, maxString); err != nil { // type "Error"
		return err
	}
	if err := c.skipUints(1); err != nil { // level
		return err
	}
	if _, err := wire.ReadString(c.r, maxString); err != nil { // name
		return err
	}
	msg, err := wire.ReadString(c.r, maxString)
	if err != nil {
		return err
	}
	if err := c.skipUints(1); err != nil { // havePos (always 0)
		return err
	}
	n, err := wire.ReadUint64(c.r)
	if err != nil {
		return err
	}
	for i := uint64(0); i < n; i++ {
		if err := c.skipUints(1); err != nil {
			return err
		}
		if _, err := wire.ReadString(c.r, maxString); err != nil {
			return err
		}
	}
	return &DaemonError{Msg: msg}
}

func (c *conn) skipUints(n int) error {
	for i := 0; i < n; i++ {
		if _, err := wire.ReadUint64(c.r); err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) skipFields() error {
	n, err := wire.ReadUint64(c.r)
	if err != nil {
		return err
	}
	for i := uint64(0); i < n; i++ {
		typ, err := wire.ReadUint64(c.r)
		if err != nil {
			return err
		}
		switch typ {
		case 0:
			err = c.skipUints(1)
		case 1:
			_, err = wire.ReadString(c.r, maxString)
		default:
			err = fmt.Errorf("unknown field type %d", typ)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) send(op uint64, args ...any) error {
	if err := wire.WriteUint64(c.w, op); err != nil {
		return err
	}
	for _, a := range args {
		var err error
		switch v := a.(type) {
		case string:
			err = wire.WriteString(c.w, v)
		case bool:
			err = wire.WriteBool(c.w, v)
		case []string:
			err = writeStrings(c.w, v)
		default:
			err = fmt.Errorf("cannot send %T", a)
		}
		if err != nil {
			return err
		}
	}
	if err := c.w.Flush(); err != nil {
		return err
	}
	return c.processStderr()
}

func writeStrings(w io.Writer, ss []string) error {
	if err := wire.WriteUint64(w, uint64(len(ss))); err != nil {
		return err
	}
	for _, s := range ss {
		if err := wire.WriteString(w, s); err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) readStrings() ([]string, error) {
	n, err := wire.ReadUint64(c.r)
	if err != nil {
		return nil, err
	}
	if n > maxList {
		return nil, fmt.Errorf("list of %d strings is too long", n)
	}
	out := make([]string, 0, n)
	for i := uint64(0); i < n; i++ {
		s, err := wire.ReadString(c.r, maxString)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

func (c *conn) queryPathInfo(p string) (*PathInfo, error) {
	if err := c.send(opQueryPathInfo, p); err != nil {
		return nil, err
	}
	valid, err := wire.ReadBool(c.r)
	if err != nil {
		return nil, err
	}
	if !valid {
		return nil, nil
	}
	info := &PathInfo{Path: p}
	if info.Deriver, err = wire.ReadString(c.r, maxString); err != nil {
		return nil, err
	}
	hash, err := wire.ReadString(c.r, maxString)
	if err != nil {
		return nil, err
	}
	if info.NarHash, err = hex.DecodeString(hash); err != nil || len(info.NarHash) != 32 {
		return nil, fmt.Errorf("daemon sent NarHash %q, want base16 SHA-256", hash)
	}
	if info.References, err = c.readStrings(); err != nil {
		return nil, err
	}
	sort.Strings(info.References)
	regTime, err := wire.ReadUint64(c.r)
	if err != nil {
		return nil, err
	}
	info.RegistrationTime = int64(regTime)
	if info.NarSize, err = wire.ReadUint64(c.r); err != nil {
		return nil, err
	}
	if info.Ultimate, err = wire.ReadBool(c.r); err != nil {
		return nil, err
	}
	if info.Sigs, err = c.readStrings(); err != nil {
		return nil, err
	}
	if info.CA, err = wire.ReadString(c.r, maxString); err != nil {
		return nil, err
	}
	return info, nil
}

func (c *conn) queryValidPaths(paths []string) ([]string, error) {
	args := []any{paths}
	if c.minor() >= 27 {
		args = append(args, false) // do not substitute
	}
	if err := c.send(opQueryValidPaths, args...); err != nil {
		return nil, err
	}
	return c.readStrings()
}

// dialStdio starts `nix-daemon --stdio` and speaks the protocol over its
// stdin and stdout.
func dialStdio(ctx context.Context, bin string, stall time.Duration) (*conn, error) {
	cmd := exec.Command(bin, "--stdio")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &pipeConn{cmd: cmd, in: stdin, out: stdout}
	return handshake(ctx, p, p, stall)
}

// stallGuard closes a connection whose read or write blocks longer than
// timeout: the daemon protocol has no timeouts of its own, and a hung
// daemon must not hold a worker forever.
type stallGuard struct {
	rw       io.ReadWriter
	timeout  time.Duration
	onStall  func()
	received *int64 // bytes read, counted
}

// ErrStalled is wrapped by the error of a request the daemon did not
// answer in time.
var ErrStalled = errors.New("the nix daemon stopped answering")

func (s *stallGuard) guard(n int, err error, t *time.Timer) (int, error) {
	if !t.Stop() {
		return n, fmt.Errorf("%w (nothing for %v); connection closed: %v", ErrStalled, s.timeout, err)
	}
	return n, err
}

func (s *stallGuard) Read(p []byte) (int, error) {
	t := time.AfterFunc(s.timeout, s.onStall)
	n, err := s.rw.Read(p)
	*s.received += int64(n)
	return s.guard(n, err, t)
}

func (s *stallGuard) Write(p []byte) (int, error) {
	t := time.AfterFunc(s.timeout, s.onStall)
	n, err := s.rw.Write(p)
	return s.guard(n, err, t)
}

type pipeConn struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out io.ReadCloser
}

func (p *pipeConn) Read(b []byte) (int, error)  { return p.out.Read(b) }
func (p *pipeConn) Write(b []byte) (int, error) { return p.in.Write(b) }
func (p *pipeConn) Close() error {
	p.in.Close()
	p.cmd.Process.Kill()
	return p.cmd.Wait()
}
