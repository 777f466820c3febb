// Package protocol is the wire protocol between agentd and its clients (the
// post-build hook and agentctl). It is deliberately small so that the hook can
// speak it with a few raw system calls.
//
// # Framing
//
// A client connects to agentd's unix socket, writes exactly one request, and
// reads exactly one response; then both sides close. A request and a response
// are each one JSON object followed by a newline ("\n"). A request may be at
// most MaxRequestSize bytes (1 MiB, room for about 10000 store paths)
// including the newline; agentd answers a longer, truncated or malformed
// request with an error response and closes.
//
// # Limits
//
// agentd serves a bounded number of connections at once, in total and per
// peer uid (root, which runs the post-build hook, counts only towards the
// total); a client over a limit gets one error response, "agentd is busy:
// ...", and should try again later (the hook spools). A request longer than
// SmallRequestSize waits for one of a few slots for large requests, so that
// the memory all connections hold stays bounded.
//
// # Versioning
//
// Every request carries "v" (the protocol version it speaks). agentd answers
// a request whose version it does not know with an error naming the versions
// it supports. Fields may be added to requests and responses within a version;
// readers ignore fields they do not know.
//
// # Operations
//
//	enqueue  paths, drv  hook: queue built outputs; durable ack ("ok")
//	         floating    the drv has floating CA outputs: agentd resolves them
//	push     paths       agentctl push: same, paths given by an operator
//	         closure     also queue every path in their closures
//	status               queue counts, last error, in-flight uploads
//	list     state       jobs in a state ("ready", "leased", "failed", or "" for all)
//	retry    id | all    failed job(s) back to ready
//	drop     id          remove a job (and its GC root)
//	doctor               agentd checks its configuration, keys, store and cache
//	audit    deep, keys  agentd audits its cache (read-only); result in "result"
//	forget               agentd forgets what it knows the cache holds
//	gc       keep_since_ns, grace_ns, dry_run
//	                     agentd runs one garbage collection cycle on its cache;
//	                     result in "result" (a cachegc.Report)
//	pin      name, paths (one)  name a root (the path is uploaded first if the
//	                     cache lacks it); result: the pin
//	unpin    name        remove a pin
//	pins                 list the pins; result: an array of pins
//	wait     paths       where each path stands ("waits"): in the cache, queued
//	                     (its job is then scheduled before others for a while;
//	                     agentctl wait asks again until each path is settled),
//	                     failed, spooled, or unknown. Added within version 1:
//	                     an older agentd answers "unknown operation".
//
// # Long operations
//
// An operation that takes long (audit, gc, pin) may send any number of progress lines
// before its response: objects with "progress" and without "ok". A client
// that asked for such an operation reads lines until one without
// "progress". The connection has no overall deadline then; agentd gives up
// on a client that stops reading.
//
// A response has "ok": true and the data of the operation, or "ok": false and
// "error", a one-line reason.
package protocol

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// Version is the protocol version this package speaks.
const Version = 1

// MaxRequestSize bounds one request, newline included.
const MaxRequestSize = 1 << 20

// SmallRequestSize is how much of a request is read before a reader must
// make room for a large one (see ReadRequestGrowing). Every request but a
// push of many paths fits.
const SmallRequestSize = 64 << 10

// MaxResponseSize bounds one response, newline included.
const MaxResponseSize = 64 << 20

// Operations.
const (
	OpEnqueue = "enqueue"
	OpPush    = "push"
	OpStatus  = "status"
	OpList    = "list"
	OpRetry   = "retry"
	OpDrop    = "drop"
	OpDoctor  = "doctor"
	OpAudit   = "audit"
	OpForget  = "forget"
	OpGC      = "gc"
	OpPin     = "pin"
	OpUnpin   = "unpin"
	OpPins    = "pins"
	OpWait    = "wait"
)

// Where a path stands, in a PathWait.
const (
	WaitCached    = "cached"    // its narinfo is in the cache: settled
	WaitFailed    = "failed"    // its job is in the dead letter: settled
	WaitUnknown   = "unknown"   // neither queued, spooled nor in the cache: settled
	WaitReady     = "ready"     // queued, waiting for a worker
	WaitRetrying  = "retrying"  // queued, backing off after a failed attempt
	WaitUploading = "uploading" // being uploaded
	WaitSpooled   = "spooled"   // in a spooled hook request, not imported yet
	WaitChecking  = "checking"  // agentd could not ask the cache yet (Error says why)
)

// PathWait is where one path of a wait request stands.
type PathWait struct {
	Path  string `json:"path"`
	State string `json:"state"`
	Job   uint64 `json:"job,omitempty"`
	Error string `json:"error,omitempty"` // failed: the reason; retrying: the last error
}

// Settled reports whether waiting longer cannot change the path's state.
func (w PathWait) Settled() bool {
	return w.State == WaitCached || w.State == WaitFailed || w.State == WaitUnknown
}

// Request is one client request.
type Request struct {
	V     int      `json:"v"`
	Op    string   `json:"op"`
	Paths []string `json:"paths,omitempty"`
	Drv   string   `json:"drv,omitempty"`
	ID    uint64   `json:"id,omitempty"`
	All   bool     `json:"all,omitempty"`
	State string   `json:"state,omitempty"`
	// Source (list): only jobs from this source (hook, push, capture,
	// build-closure, unknown).
	Source  string `json:"source,omitempty"`
	Closure bool   `json:"closure,omitempty"`
	// BuildClosure (push): queue what building the paths needed (see
	// agentctl push --build-closure) instead of the paths.
	BuildClosure bool     `json:"build_closure,omitempty"`
	Floating     bool     `json:"floating,omitempty"`
	Deep         bool     `json:"deep,omitempty"`
	Keys         []string `json:"keys,omitempty"` // audit: trusted public keys
	// gc: the retention, the grace period, and whether to only report.
	KeepSince time.Duration `json:"keep_since_ns,omitempty"`
	Grace     time.Duration `json:"grace_ns,omitempty"`
	DryRun    bool          `json:"dry_run,omitempty"`
	// Name is a pin's name (pin, unpin).
	Name string `json:"name,omitempty"`
}

// Response is agentd's answer to one request.
type Response struct {
	V     int    `json:"v"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	Jobs  []Job  `json:"jobs,omitempty"`
	// Skipped (push --build-closure): what was left out, each with why.
	Skipped []string `json:"skipped,omitempty"`
	Status  *Status  `json:"status,omitempty"`
	Count   int      `json:"count,omitempty"`
	Checks  []Check  `json:"checks,omitempty"`
	// Result is the outcome of a long operation (audit: an audit.Report).
	Result json.RawMessage `json:"result,omitempty"`
	// Waits answers OpWait: one entry per path, in the request's order.
	Waits []PathWait `json:"waits,omitempty"`
	// Progress, on a line before the response, reports a long
	// operation's progress.
	Progress *Progress `json:"progress,omitempty"`
}

// Progress is one progress report of a long operation.
type Progress struct {
	Stage string `json:"stage"`
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
}

// Check is one line of `agentctl doctor`.
type Check struct {
	Name   string `json:"name"`
	Status string `json:"status"` // "ok", "warn" or "fail"
	Detail string `json:"detail,omitempty"`
	Hint   string `json:"hint,omitempty"`
}

// Job describes one queued store path.
type Job struct {
	ID         uint64 `json:"id"`
	Path       string `json:"path"`
	Drv        string `json:"drv,omitempty"`
	State      string `json:"state"`
	Attempts   int    `json:"attempts"`
	EnqueuedAt int64  `json:"enqueued_at"`          // unix seconds
	NotBefore  int64  `json:"not_before,omitempty"` // unix seconds
	LastError  string `json:"last_error"`
	// Source is where the path came from: hook, push, capture,
	// build-closure, or unknown (queued before agentd recorded sources).
	Source string `json:"source,omitempty"`
}

// Upload is one upload in progress.
type Upload struct {
	Path      string `json:"path"`
	BytesDone int64  `json:"bytes_done"`
	BytesSize int64  `json:"bytes_total"`
}

// Status is the answer to OpStatus. Field names are stable: scripts use them.
type Status struct {
	Version              string   `json:"version"`
	UptimeSeconds        int64    `json:"uptime_seconds"`
	Cache                string   `json:"cache"`
	CacheReachable       *bool    `json:"cache_reachable"`
	Pending              int      `json:"pending"`
	Uploading            int      `json:"uploading"`
	Retrying             int      `json:"retrying"`
	Failed               int      `json:"failed"`
	Uploaded             uint64   `json:"uploaded"`
	UploadedNARBytes     uint64   `json:"uploaded_nar_bytes"`
	UploadedFileBytes    uint64   `json:"uploaded_file_bytes"`
	UploadedPaths        uint64   `json:"uploaded_paths"`
	Skipped              uint64   `json:"skipped"`
	UploadedRealisations uint64   `json:"uploaded_realisations"` // realisation objects (.doi) written
	RatePathsPerSecond   float64  `json:"rate_paths_per_second"`
	RateNARBytesPerSec   float64  `json:"rate_nar_bytes_per_second"`
	OldestPendingSeconds int64    `json:"oldest_pending_seconds"`
	OldestPendingJob     uint64   `json:"oldest_pending_job"` // id; 0 when nothing is pending
	NewestJob            uint64   `json:"newest_job"`         // last job id assigned
	LastError            string   `json:"last_error"`
	LastErrorAt          int64    `json:"last_error_at"`
	NextRetryAt          int64    `json:"next_retry_at"`
	InProgress           []Upload `json:"in_progress"`
	StateDirError        string   `json:"state_dir_error"`
	// KnownPresent is how many paths agentd knows the cache holds (its
	// presence cache, bound to the cache's current generation).
	KnownPresent int `json:"known_present"`
	// RequestWindow is the adaptive limit of requests in flight to the
	// bucket; RequestsInFlight how many are.
	RequestWindow    int     `json:"request_window"`
	RequestsInFlight int     `json:"requests_in_flight"`
	Spooled          Spooled `json:"spooled"`
	// QueuedBySource counts the queued jobs (pending, uploading, retrying
	// and failed) by where their paths came from (see Job.Source).
	QueuedBySource map[string]int `json:"queued_by_source"`
	// Capture is the store watcher's state (agentd --capture); nil when
	// it is off (--capture hook).
	Capture *Capture `json:"capture,omitempty"`
	// TimeToCache is the time from paths' acknowledgement (by a hook or a
	// push) to their narinfo being in the cache, over the last 15 minutes.
	TimeToCache TimeToCache `json:"time_to_cache"`
}

// Capture is the state of the store watcher.
type Capture struct {
	Mode string `json:"mode"` // local or all
	// Cursor is the last row of the store's database seen; Captured how
	// many paths the watcher queued since agentd started.
	Cursor   int64  `json:"cursor"`
	Captured uint64 `json:"captured"`
	// LastCycleAt is when the last cycle ended (unix seconds); Error the
	// last cycle's error, if it failed.
	LastCycleAt int64  `json:"last_cycle_at"`
	Error       string `json:"error,omitempty"`
}

// TimeToCache summarises the time to cache of the paths done in the last
// 15 minutes (to within about 5%).
type TimeToCache struct {
	Paths      uint64  `json:"paths"` // jobs done in the window
	P50Seconds float64 `json:"p50_seconds"`
	P99Seconds float64 `json:"p99_seconds"`
}

// Spooled counts the requests waiting in the spool directory: hooks that
// could not hand their paths to agentd spooled them, and agentd imports them
// every spool interval. They are not jobs yet.
type Spooled struct {
	Files    int   `json:"files"`
	Paths    int   `json:"paths"`
	OldestAt int64 `json:"oldest_at"` // unix seconds the oldest was spooled; 0 when none
}

// ErrTooLarge is returned by ReadRequest for a request over MaxRequestSize.
var ErrTooLarge = fmt.Errorf("request exceeds the maximum size of %d bytes (about 10000 store paths; send fewer paths per request)", MaxRequestSize)

// ReadRequest reads and decodes one newline-terminated request, refusing
// anything longer than MaxRequestSize.
func ReadRequest(r io.Reader) (*Request, error) {
	return ReadRequestGrowing(r, nil)
}

// ReadRequestGrowing is ReadRequest holding at most SmallRequestSize bytes
// of the request until it proves longer; then grow (if not nil) is called
// once before reading on, up to MaxRequestSize. grow may wait for memory to
// become available; its error ends the read and is returned.
//
// It reads from r in chunks and may read past the newline: a connection
// carries one request.
func ReadRequestGrowing(r io.Reader, grow func() error) (*Request, error) {
	line, err := readRequestLine(r, SmallRequestSize, MaxRequestSize, grow)
	if err != nil {
		return nil, err
	}
	return DecodeRequest(line)
}

// readRequestLine reads one line into a buffer of small bytes, and into one
// of max bytes (after grow) once the line proves longer: the buffer is
// allocated once for each size instead of growing by copies.
func readRequestLine(r io.Reader, small, max int, grow func() error) ([]byte, error) {
	buf := make([]byte, min(small, max))
	n := 0
	for {
		if n == len(buf) {
			if n >= max {
				return nil, ErrTooLarge
			}
			if grow != nil {
				if err := grow(); err != nil {
					return nil, err
				}
			}
			big := make([]byte, max)
			copy(big, buf[:n])
			buf = big
		}
		m, err := r.Read(buf[n:])
		if i := bytes.IndexByte(buf[n:n+m], '\n'); i >= 0 {
			return buf[:n+i], nil
		}
		n += m
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			if n == 0 {
				return nil, errors.New("connection closed before a request")
			}
			return nil, errors.New("truncated message (no newline)")
		default:
			return nil, err
		}
	}
}

// DecodeRequest decodes one request line (without its newline) and checks
// the fields every operation needs.
func DecodeRequest(line []byte) (*Request, error) {
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("malformed request: %w", err)
	}
	if dec.More() {
		return nil, errors.New("malformed request: trailing data after the JSON object")
	}
	if req.V != Version {
		return nil, fmt.Errorf("unsupported protocol version %d (this agentd speaks %d)", req.V, Version)
	}
	switch req.Op {
	case OpEnqueue, OpPush:
		if len(req.Paths) == 0 && !(req.Op == OpEnqueue && req.Floating && req.Drv != "") {
			return nil, fmt.Errorf("%s: no paths", req.Op)
		}
	case OpStatus, OpList, OpDoctor, OpAudit, OpForget, OpPins:
	case OpWait:
		if len(req.Paths) == 0 {
			return nil, errors.New("wait: no paths")
		}
	case OpGC:
		if req.Grace <= 0 || req.KeepSince < 0 {
			return nil, errors.New("gc: need a positive grace and a keep-since that is not negative")
		}
	case OpPin:
		if req.Name == "" || len(req.Paths) != 1 {
			return nil, errors.New("pin: need a name and one path")
		}
	case OpUnpin:
		if req.Name == "" {
			return nil, errors.New("unpin: need a name")
		}
	case OpRetry:
		if req.ID == 0 && !req.All {
			return nil, errors.New("retry: need an id or all")
		}
	case OpDrop:
		if req.ID == 0 {
			return nil, errors.New("drop: need an id")
		}
	default:
		return nil, fmt.Errorf("unknown operation %q", req.Op)
	}
	return &req, nil
}

// ReadResponse reads and decodes one response.
func ReadResponse(r io.Reader) (*Response, error) {
	line, err := readLine(r, MaxResponseSize)
	if err != nil {
		return nil, err
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("malformed response: %w", err)
	}
	return &resp, nil
}

// Encode renders v (a Request or Response) as one protocol line.
func Encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// readLine reads one line of at most max bytes. Given a *bufio.Reader it
// reads from it directly, so that several lines can be read from one
// stream; otherwise it reads no further than max bytes.
func readLine(r io.Reader, max int) ([]byte, error) {
	br, shared := r.(*bufio.Reader)
	if !shared {
		br = bufio.NewReaderSize(io.LimitReader(r, int64(max)), 4096)
	}
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if shared && len(line) > max {
			return nil, ErrTooLarge
		}
		switch {
		case err == nil:
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			if len(line) >= max {
				return nil, ErrTooLarge
			}
			if len(line) == 0 {
				return nil, errors.New("connection closed before a request")
			}
			return nil, errors.New("truncated message (no newline)")
		default:
			return nil, err
		}
	}
}

// Summary is the one-line queue summary used for systemd's STATUS= and by
// `agentctl watch` when its output is not a terminal.
func Summary(s *Status) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d pending, %d uploading, %d retrying, %d failed; %d uploaded", s.Pending, s.Uploading, s.Retrying, s.Failed, s.Uploaded)
	if s.RatePathsPerSecond > 0 {
		fmt.Fprintf(&b, " (%.1f paths/s, %.1f MB/s)", s.RatePathsPerSecond, s.RateNARBytesPerSec/1e6)
	}
	if t := s.TimeToCache; t.Paths > 0 {
		fmt.Fprintf(&b, "; time to cache p50 %s, p99 %s", Seconds(t.P50Seconds), Seconds(t.P99Seconds))
	}
	if s.Spooled.Files > 0 {
		fmt.Fprintf(&b, "; %d spooled request(s) not imported yet", s.Spooled.Files)
	}
	if s.CacheReachable != nil && !*s.CacheReachable {
		b.WriteString("; cache unreachable")
	}
	return b.String()
}

// Seconds renders a duration given in seconds for people: "850ms", "3.2s",
// "4m10s".
func Seconds(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	default:
		return d.Round(time.Second).String()
	}
}
