package main

// Golden tests of what scripts depend on: agentctl's output and exit status
// for the commands users script against, with a fake agentd that speaks the
// real protocol on a unix socket. Rewrite the golden files after an
// intended change with:
//
//	go test ./cmd/agentctl -run TestGolden -update

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixspool/nixspool/protocol"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

// fakeAgentd answers each request on a unix socket with answer's response.
type fakeAgentd struct {
	socket string
	answer func(req *protocol.Request) *protocol.Response

	mu   sync.Mutex
	reqs []*protocol.Request
}

func startFakeAgentd(t *testing.T, answer func(*protocol.Request) *protocol.Response) *fakeAgentd {
	t.Helper()
	f := &fakeAgentd{socket: filepath.Join(t.TempDir(), "agentd.sock"), answer: answer}
	l, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(f.socket, 0o660); err != nil { // as nixspool.socket makes it
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
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				req, err := protocol.ReadRequest(c)
				if err != nil {
					return
				}
				f.mu.Lock()
				f.reqs = append(f.reqs, req)
				f.mu.Unlock()
				resp := f.answer(req)
				resp.V = protocol.Version
				resp.OK = resp.Error == ""
				b, err := protocol.Encode(resp)
				if err == nil {
					c.Write(b)
				}
			}()
		}
	}()
	return f
}

// A fixed clock for ages ("3m0s ago").
var goldenNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func at(d time.Duration) int64 { return goldenNow.Add(d).Unix() }

const (
	pathA = "/nix/store/0a0ia3sqpaxhfzd0r8z1y1v7f4s0bgwr-hello-2.12"
	pathB = "/nix/store/1b1jb4trqbyigae1s9a2z2w8g5t1chxs-libfoo-1.0"
	pathC = "/nix/store/2c2kc5vsrcziha2f2b3a3x9h6v2dixzt-tool-3.1"
)

func fullStatus() *protocol.Status {
	yes := true
	return &protocol.Status{
		Version: "1.2.3", UptimeSeconds: 3725, Cache: "s3://cache?region=eu-west-1", CacheReachable: &yes,
		Pending: 3, Uploading: 1, Retrying: 1, Failed: 2,
		Uploaded: 120, UploadedPaths: 150, UploadedNARBytes: 3 << 30, UploadedFileBytes: 1 << 30,
		UploadedRealisations: 4, Skipped: 2,
		RatePathsPerSecond: 1.5, RateNARBytesPerSec: 2.5e6,
		OldestPendingSeconds: 95, OldestPendingJob: 41, NewestJob: 48,
		LastError: "PUT nar/abc.nar.zst: 503 Slow Down\nretrying", LastErrorAt: at(-3 * time.Minute),
		NextRetryAt:  at(30 * time.Second),
		InProgress:   []protocol.Upload{{Path: pathA, BytesDone: 5 << 20, BytesSize: 20 << 20}},
		KnownPresent: 900, RequestWindow: 16, RequestsInFlight: 3,
		Spooled:        protocol.Spooled{Files: 1, Paths: 2, OldestAt: at(-time.Hour)},
		QueuedBySource: map[string]int{"hook": 5, "push": 2},
		TimeToCache:    protocol.TimeToCache{Paths: 10, P50Seconds: 1.5, P99Seconds: 12},
	}
}

func jobs() []protocol.Job {
	return []protocol.Job{
		{ID: 41, Path: pathA, State: "leased", EnqueuedAt: at(-95 * time.Second), Source: "hook"},
		{ID: 42, Path: pathB, State: "retrying", Attempts: 3, EnqueuedAt: at(-80 * time.Second), NotBefore: at(30 * time.Second), LastError: "503 Slow Down", Source: "hook"},
		{ID: 43, Path: pathC, State: "failed", Attempts: 1, EnqueuedAt: at(-60 * time.Second), LastError: "NarHash mismatch:\nstore says sha256:aaa, read sha256:bbb", Source: "push"},
	}
}

// drained is the status once every job up to 48 has left the queue.
func drained() *protocol.Status {
	s := fullStatus()
	s.Pending, s.Uploading, s.Retrying, s.OldestPendingJob, s.Spooled = 0, 0, 0, 0, protocol.Spooled{}
	return s
}

type goldenCase struct {
	name     string
	args     []string
	answer   func(*protocol.Request) *protocol.Response
	noAgentd bool
}

func byOp(m map[string]*protocol.Response) func(*protocol.Request) *protocol.Response {
	return func(req *protocol.Request) *protocol.Response {
		if r, ok := m[req.Op]; ok {
			c := *r
			return &c
		}
		return &protocol.Response{Error: "unknown operation " + req.Op}
	}
}

// statusSequence answers status requests with each status in turn (the
// last one from then on), and list requests with no jobs.
func statusSequence(ss ...*protocol.Status) func(*protocol.Request) *protocol.Response {
	var mu sync.Mutex
	return func(req *protocol.Request) *protocol.Response {
		switch req.Op {
		case protocol.OpStatus:
			mu.Lock()
			defer mu.Unlock()
			s := ss[0]
			if len(ss) > 1 {
				ss = ss[1:]
			}
			return &protocol.Response{Status: s}
		case protocol.OpList:
			return &protocol.Response{}
		}
		return &protocol.Response{Error: "unknown operation " + req.Op}
	}
}

func waits(ws ...protocol.PathWait) *protocol.Response { return &protocol.Response{Waits: ws} }

func TestGolden(t *testing.T) {
	now = func() time.Time { return goldenNow }
	t.Cleanup(func() { now = time.Now })
	failedJob := jobs()[2:]
	cases := []goldenCase{
		{name: "status", args: []string{"status"}, answer: byOp(map[string]*protocol.Response{protocol.OpStatus: {Status: fullStatus()}})},
		{name: "status-json", args: []string{"status", "--json"}, answer: byOp(map[string]*protocol.Response{protocol.OpStatus: {Status: fullStatus()}})},
		{name: "list", args: []string{"list"}, answer: byOp(map[string]*protocol.Response{protocol.OpList: {Jobs: jobs()}})},
		{name: "list-failed-json", args: []string{"list", "--state", "failed", "--json"}, answer: byOp(map[string]*protocol.Response{protocol.OpList: {Jobs: failedJob}})},
		{name: "list-empty-json", args: []string{"list", "--json"}, answer: byOp(map[string]*protocol.Response{protocol.OpList: {}})},
		{name: "list-bad-state", args: []string{"list", "--state", "done"}},
		// wait without paths: 0 all uploaded, 1 failed jobs remain, 3 timeout.
		{name: "wait-uploaded", args: []string{"wait"}, answer: byOp(map[string]*protocol.Response{protocol.OpStatus: {Status: drained()}, protocol.OpList: {}})},
		// Only jobs queued before the call count (ids up to newest_job).
		{name: "wait-failed", args: []string{"wait"}, answer: byOp(map[string]*protocol.Response{protocol.OpStatus: {Status: drained()}, protocol.OpList: {Jobs: append(failedJob,
			protocol.Job{ID: 50, Path: pathA, State: "failed", LastError: "queued after the call"})}})},
		{name: "wait-uploaded-after-polls", args: []string{"wait"}, answer: statusSequence(fullStatus(), drained())},
		{name: "wait-timeout", args: []string{"wait", "--timeout", "1ms"}, answer: byOp(map[string]*protocol.Response{protocol.OpStatus: {Status: fullStatus()}})},
		// wait with paths: the same statuses, per path.
		{name: "wait-paths-cached", args: []string{"wait", pathA, pathB}, answer: byOp(map[string]*protocol.Response{protocol.OpWait: waits(
			protocol.PathWait{Path: pathA, State: protocol.WaitCached}, protocol.PathWait{Path: pathB, State: protocol.WaitCached})})},
		{name: "wait-paths-failed", args: []string{"wait", pathA, pathB, pathC}, answer: byOp(map[string]*protocol.Response{protocol.OpWait: waits(
			protocol.PathWait{Path: pathA, State: protocol.WaitCached},
			protocol.PathWait{Path: pathB, State: protocol.WaitUnknown},
			protocol.PathWait{Path: pathC, State: protocol.WaitFailed, Job: 43, Error: "NarHash mismatch"})})},
		{name: "wait-paths-timeout", args: []string{"wait", "--timeout", "1ms", pathA, pathB}, answer: byOp(map[string]*protocol.Response{protocol.OpWait: waits(
			protocol.PathWait{Path: pathA, State: protocol.WaitUploading, Job: 41},
			protocol.PathWait{Path: pathB, State: protocol.WaitRetrying, Job: 42, Error: "503 Slow Down"})})},
		{name: "doctor-ok", args: []string{"doctor"}, answer: byOp(map[string]*protocol.Response{protocol.OpDoctor: {Checks: []protocol.Check{
			{Name: "store", Status: "ok", Detail: "nix-daemon at /nix/var/nix/daemon-socket/socket"},
			{Name: "cache", Status: "warn", Detail: "no nix-cache-info yet", Hint: "agentd writes it with the first upload"},
		}}})},
		{name: "doctor-fail", args: []string{"doctor"}, answer: byOp(map[string]*protocol.Response{protocol.OpDoctor: {Checks: []protocol.Check{
			{Name: "signing key", Status: "fail", Detail: "/etc/nixspool/secret.key: permission denied", Hint: "agentd's user must read it"},
		}}})},
		{name: "doctor-not-running", args: []string{"doctor"}, noAgentd: true},
		{name: "status-not-running", args: []string{"status"}, noAgentd: true},
		{name: "drop-refused", args: []string{"drop", "42"}, answer: byOp(map[string]*protocol.Response{
			protocol.OpDrop: {Error: "permission denied: drop needs root, agentd's user or a member of the admin group (nixspool-admin)"}})},
		{name: "retry-bad-id", args: []string{"retry", "x"}},
		{name: "unknown-command", args: []string{"frobnicate"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var socket string
			switch {
			case tc.noAgentd:
				socket = filepath.Join(t.TempDir(), "agentd.sock")
			case tc.answer != nil:
				socket = startFakeAgentd(t, tc.answer).socket
			default: // refused before any request
				socket = startFakeAgentd(t, func(r *protocol.Request) *protocol.Response {
					t.Errorf("agentctl sent %s", r.Op)
					return &protocol.Response{Error: "unexpected"}
				}).socket
			}
			var out bytes.Buffer
			code, msg := exitStatus(run(append([]string{"--socket", socket}, tc.args...), &out))
			got := fmt.Sprintf("$ agentctl %s\n--- stdout\n%s--- stderr\n%s--- exit %d\n",
				strings.Join(tc.args, " "), out.String(), stderrLine(msg), code)
			got = strings.ReplaceAll(got, socket, "$SOCKET")
			got = strings.ReplaceAll(got, fmt.Sprintf("uid %d gid %d", os.Getuid(), os.Getgid()), "uid $UID gid $GID")
			checkGolden(t, filepath.Join("testdata", "golden", tc.name+".golden"), got)
		})
	}
}

func stderrLine(msg string) string {
	if msg == "" {
		return ""
	}
	return "agentctl: " + msg + "\n"
}

func checkGolden(t *testing.T, file, got string) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s is missing: run go test ./cmd/agentctl -run TestGolden -update", file)
	}
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (rewrite with -update if intended)\n--- got\n%s--- want\n%s", file, got, want)
	}
}
