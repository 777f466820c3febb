// Command agentctl is the operator's view of agentd: queue status, jobs,
// pushing paths by hand, and retrying or dropping failed jobs. It talks to
// agentd over its socket and never opens the queue database itself.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nixspool/nixspool/internal/audit"
	"github.com/nixspool/nixspool/protocol"
)

const usage = `usage: agentctl [--socket PATH] COMMAND [ARGS]

Commands:
  status [--json]            queue counts, totals, uploads in progress, last error
  list [--state S] [--source SRC] [--json]
                             jobs (S: ready, retrying, leased, failed;
                             SRC: hook, push, capture, build-closure, unknown)
  watch [--interval D]       live view; progress bars for uploads in progress
  push [--closure | --build-closure] PATH...
                             queue store paths for upload (--closure: every path of their closures;
                             --build-closure: what building them needed, as far as the store has it)
  retry ID | --all           move failed jobs back to the queue
  drop ID                    remove a job from the queue
  wait [--timeout D] [PATH...]
                             wait until every job queued now is uploaded or failed; with
                             paths, only for those paths' closures (uploaded first)
                             (exit 0: all uploaded, 1: failed jobs remain or a path is
                             neither queued nor in the cache, 3: timed out)
  doctor                     check the socket, configuration, keys, store and cache
  forget                     forget what agentd knows the cache holds (after resetting a
                             bucket by hand; agentd also notices a reset on its own)
  audit [--deep] [--trusted-public-keys K] [--json]
                             check that stock Nix can use everything in the cache (read-only;
                             exit 0: healthy, 1: problems found)
  gc --keep-since D --grace D [--dry-run] [--list] [--json]
                             delete what no path written within --keep-since and no pin needs,
                             announced --grace ahead so uploads stay safe (exit 0: cycle complete)
  pin NAME PATH              keep PATH and its closure until unpinned (uploads it if needed)
  unpin NAME                 remove a pin
  pins [--json]              list the pins

The socket is --socket, else $NIXSPOOL_SOCKET, else /run/nixspool/agentd.sock.
`

type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func main() {
	code, msg := exitStatus(run(os.Args[1:], os.Stdout))
	if msg != "" {
		fmt.Fprintln(os.Stderr, "agentctl:", msg)
	}
	os.Exit(code)
}

// exitStatus maps run's error to the exit status and the one-line message
// for stderr ("" for none).
func exitStatus(err error) (code int, msg string) {
	var ee *exitError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0, ""
	case errors.As(err, &ee):
		return ee.code, ee.msg
	default:
		return 1, err.Error()
	}
}

type client struct {
	socket  string
	timeout time.Duration
}

func (c *client) call(req *protocol.Request) (*protocol.Response, error) {
	resp, err := protocol.Call(c.socket, req, c.timeout)
	if err != nil {
		return nil, c.explain(err)
	}
	if !resp.OK {
		return nil, errors.New(resp.Error)
	}
	return resp, nil
}

// explain turns a failure to reach agentd into a one-line reason.
func (c *client) explain(err error) error {
	var de *protocol.DialError
	if errors.As(err, &de) {
		if errors.Is(de.Err, syscall.EACCES) {
			return fmt.Errorf("permission denied on %s: root and members of the socket's group may use agentd", c.socket)
		}
		return fmt.Errorf("agentd is not running (cannot connect to %s: %v)", c.socket, de.Err)
	}
	return err
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("agentctl", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), usage) }
	def := os.Getenv("NIXSPOOL_SOCKET")
	if def == "" {
		def = "/run/nixspool/agentd.sock"
	}
	c := &client{timeout: 30 * time.Second}
	fs.StringVar(&c.socket, "socket", def, "agentd's socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return &exitError{code: 2}
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	switch cmd {
	case "status":
		return cmdStatus(c, rest, out)
	case "list":
		return cmdList(c, rest, out)
	case "push":
		return cmdPush(c, rest, out)
	case "retry":
		return cmdRetry(c, rest, out)
	case "drop":
		return cmdDrop(c, rest, out)
	case "wait":
		return cmdWait(c, rest, out)
	case "watch":
		return cmdWatch(c, rest, out)
	case "doctor":
		return cmdDoctor(c, rest, out)
	case "audit":
		return cmdAudit(c, rest, out)
	case "forget":
		if len(rest) > 0 {
			return &exitError{code: 2, msg: "forget takes no arguments"}
		}
		resp, err := c.call(&protocol.Request{Op: protocol.OpForget})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "forgot %d paths known to be in the cache; they will be checked again\n", resp.Count)
		return nil
	case "gc":
		return cmdGC(c, rest, out)
	case "pin":
		return cmdPin(c, rest, out)
	case "unpin":
		return cmdUnpin(c, rest, out)
	case "pins":
		return cmdPins(c, rest, out)
	case "help":
		fs.Usage()
		return nil
	}
	return &exitError{code: 2, msg: fmt.Sprintf("unknown command %q (see agentctl --help)", cmd)}
}

func subFlags(name, args string) *flag.FlagSet {
	fs := flag.NewFlagSet("agentctl "+name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: agentctl %s %s\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

func cmdStatus(c *client, args []string, out io.Writer) error {
	fs := subFlags("status", "[--json]")
	asJSON := fs.Bool("json", false, "print JSON (stable field names)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	resp, err := c.call(&protocol.Request{Op: protocol.OpStatus})
	if err != nil {
		return err
	}
	s := resp.Status
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false)
		return enc.Encode(s)
	}
	return renderStatus(out, s)
}

func cmdList(c *client, args []string, out io.Writer) error {
	fs := subFlags("list", "[--state ready|retrying|leased|failed] [--source hook|push|capture|build-closure|unknown] [--json]")
	state := fs.String("state", "", "only jobs in this state")
	source := fs.String("source", "", "only jobs whose path came from this source (hook, push, capture, build-closure; unknown: queued before sources were recorded)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	qstate := *state
	switch *state {
	case "", "ready", "leased", "failed":
	case "retrying":
		qstate = "ready"
	default:
		return &exitError{code: 2, msg: fmt.Sprintf("--state %q: want ready, retrying, leased or failed", *state)}
	}
	switch *source {
	case "", "hook", "push", "capture", "build-closure", "unknown":
	default:
		return &exitError{code: 2, msg: fmt.Sprintf("--source %q: want hook, push, capture, build-closure or unknown", *source)}
	}
	resp, err := c.call(&protocol.Request{Op: protocol.OpList, State: qstate, Source: *source})
	if err != nil {
		return err
	}
	jobs := resp.Jobs
	if *state == "retrying" || *state == "ready" {
		var keep []protocol.Job
		for _, j := range jobs {
			if j.State == *state {
				keep = append(keep, j)
			}
		}
		jobs = keep
	}
	if *asJSON {
		if jobs == nil {
			jobs = []protocol.Job{}
		}
		return json.NewEncoder(out).Encode(jobs)
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tSTATE\tATTEMPTS\tAGE\tSOURCE\tPATH\tLAST ERROR")
	for _, j := range jobs {
		fmt.Fprintf(w, "%d\t%s\t%d\t%s\t%s\t%s\t%s\n", j.ID, j.State, j.Attempts, ago(j.EnqueuedAt), j.Source, j.Path, oneLine(j.LastError))
	}
	return w.Flush()
}

func cmdPush(c *client, args []string, out io.Writer) error {
	fs := subFlags("push", "[--closure | --build-closure] PATH...")
	closure := fs.Bool("closure", false, "also queue every path in the closures (for paths the hook never saw)")
	buildClosure := fs.Bool("build-closure", false, "queue what building the paths needed instead: for a .drv (or an output, through its deriver) the derivation's closure (sources, .drv files) and every output of it that is in the store; what is not is skipped and listed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return &exitError{code: 2, msg: "push: no paths given"}
	}
	if *closure && *buildClosure {
		return &exitError{code: 2, msg: "push: --closure and --build-closure exclude each other"}
	}
	resp, err := c.call(&protocol.Request{Op: protocol.OpPush, Paths: storePaths(fs.Args()), Closure: *closure, BuildClosure: *buildClosure})
	if err != nil {
		return err
	}
	for _, s := range resp.Skipped {
		fmt.Fprintf(out, "skipped %s\n", s)
	}
	if len(resp.Jobs) > 20 {
		fmt.Fprintf(out, "queued %d paths\n", len(resp.Jobs))
		return nil
	}
	for _, j := range resp.Jobs {
		fmt.Fprintf(out, "queued %s (job %d, %s)\n", j.Path, j.ID, j.State)
	}
	return nil
}

// storePaths accepts result symlinks (./result) the way nix commands do.
func storePaths(args []string) []string {
	var paths []string
	for _, p := range args {
		if abs, err := filepath.Abs(p); err == nil {
			if real, err := filepath.EvalSymlinks(abs); err == nil && strings.HasPrefix(real, "/nix/store/") && !strings.HasPrefix(abs, "/nix/store/") {
				p = real
			}
		}
		paths = append(paths, p)
	}
	return paths
}

func cmdRetry(c *client, args []string, out io.Writer) error {
	fs := subFlags("retry", "ID | --all")
	all := fs.Bool("all", false, "retry every failed job")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req := &protocol.Request{Op: protocol.OpRetry, All: *all}
	if !*all {
		id, err := parseID(fs)
		if err != nil {
			return err
		}
		req.ID = id
	}
	resp, err := c.call(req)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "%d job(s) queued again\n", resp.Count)
	return nil
}

func cmdDrop(c *client, args []string, out io.Writer) error {
	fs := subFlags("drop", "ID")
	if err := fs.Parse(args); err != nil {
		return err
	}
	id, err := parseID(fs)
	if err != nil {
		return err
	}
	resp, err := c.call(&protocol.Request{Op: protocol.OpDrop, ID: id})
	if err != nil {
		return err
	}
	for _, j := range resp.Jobs {
		fmt.Fprintf(out, "dropped job %d (%s)\n", j.ID, j.Path)
	}
	return nil
}

// cmdWait blocks until every job queued when it started has left the queue
// (uploaded) or failed. Job ids grow with time, so "queued when it started"
// is "id up to the newest id then", and the oldest pending id tells when
// they are all done: two counters per poll, whatever the queue's size.
// Requests hooks spooled before the call (agentd was unreachable) are not
// jobs yet: wait first waits until they are imported, and then for the jobs
// they became too.
// Exit status: 0 all uploaded, 1 some are in the dead letter (failed now or
// earlier and not yet retried or dropped), 3 timeout.
func cmdWait(c *client, args []string, out io.Writer) error {
	fs := subFlags("wait", "[--timeout D] [PATH...]")
	timeout := fs.Duration("timeout", 0, "give up after this long (0: wait forever)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return waitPaths(c, storePaths(fs.Args()), *timeout, out)
	}
	started := time.Now()
	resp, err := c.call(&protocol.Request{Op: protocol.OpStatus})
	if err != nil {
		return err
	}
	last := resp.Status.NewestJob
	var deadline time.Time
	if *timeout > 0 {
		deadline = started.Add(*timeout)
	}
	importing := false
	for {
		s := resp.Status
		// Spooled before the call (to the second; a later one may be
		// waited for too, which is harmless).
		spooled := s.Spooled.Files > 0 && s.Spooled.OldestAt <= started.Unix()
		if spooled {
			importing = true
		} else if importing {
			// Everything spooled before the call is imported now: its
			// jobs are at most the newest one.
			last = max(last, s.NewestJob)
			importing = false
		}
		if !spooled && (s.OldestPendingJob == 0 || s.OldestPendingJob > last) {
			break
		}
		if !deadline.IsZero() && time.Now().After(deadline) {
			msg := fmt.Sprintf("timed out: %d job(s) still queued (%d retrying)", s.Pending+s.Uploading+s.Retrying, s.Retrying)
			if spooled {
				msg += fmt.Sprintf(", %d spooled request(s) (%d paths) not imported yet", s.Spooled.Files, s.Spooled.Paths)
			}
			return &exitError{code: 3, msg: msg}
		}
		time.Sleep(200 * time.Millisecond)
		if resp, err = c.call(&protocol.Request{Op: protocol.OpStatus}); err != nil {
			return err
		}
	}
	resp, err = c.call(&protocol.Request{Op: protocol.OpList, State: "failed"})
	if err != nil {
		return err
	}
	failed := 0
	for _, j := range resp.Jobs {
		if j.ID <= last {
			fmt.Fprintf(out, "failed: %s: %s\n", j.Path, oneLine(j.LastError))
			failed++
		}
	}
	if failed > 0 {
		return &exitError{code: 1, msg: fmt.Sprintf("%d job(s) failed", failed)}
	}
	fmt.Fprintln(out, "all queued paths are uploaded")
	return nil
}

// waitPoll is how often wait asks agentd again.
const waitPoll = 200 * time.Millisecond

// waitPaths blocks until each of paths is in the cache (its closure with
// it), failed, or known to be neither queued nor in the cache; meanwhile
// agentd uploads their jobs before others. Exit status: 0 all in the
// cache, 1 some failed or are not queued, 3 timeout (naming what is still
// missing).
func waitPaths(c *client, paths []string, timeout time.Duration, out io.Writer) error {
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	pending := paths
	var failed, unknown []protocol.PathWait
	for {
		resp, err := c.call(&protocol.Request{Op: protocol.OpWait, Paths: pending})
		if err != nil {
			if strings.Contains(err.Error(), `unknown operation "wait"`) {
				return errors.New("this agentd cannot wait for given paths (it is older than this agentctl): upgrade it, or wait for everything queued with `agentctl wait` without paths")
			}
			return err
		}
		if len(resp.Waits) != len(pending) {
			return fmt.Errorf("wait: agentd answered for %d paths, asked for %d", len(resp.Waits), len(pending))
		}
		var still []protocol.PathWait
		for _, w := range resp.Waits {
			switch w.State {
			case protocol.WaitFailed:
				failed = append(failed, w)
			case protocol.WaitUnknown:
				unknown = append(unknown, w)
			case protocol.WaitCached:
			default:
				still = append(still, w)
			}
		}
		if len(still) == 0 {
			break
		}
		if !deadline.IsZero() && time.Now().After(deadline) {
			fmt.Fprintf(out, "still missing after %s:\n", timeout)
			for _, w := range still {
				fmt.Fprintf(out, "  %s: %s\n", w.Path, describeWait(w))
			}
			return &exitError{code: 3, msg: fmt.Sprintf("timed out: %d of %d path(s) not in the cache yet (%s)", len(still), len(paths), waitNames(still))}
		}
		pending = pending[:0:0]
		for _, w := range still {
			pending = append(pending, w.Path)
		}
		time.Sleep(waitPoll)
	}
	for _, w := range failed {
		fmt.Fprintf(out, "failed: %s (job %d): %s\n", w.Path, w.Job, oneLine(w.Error))
	}
	for _, w := range unknown {
		fmt.Fprintf(out, "not queued: %s is neither queued nor in the cache (agentctl push it)\n", w.Path)
	}
	if len(failed)+len(unknown) > 0 {
		var parts []string
		if len(failed) > 0 {
			parts = append(parts, fmt.Sprintf("%d failed (%s)", len(failed), waitNames(failed)))
		}
		if len(unknown) > 0 {
			parts = append(parts, fmt.Sprintf("%d neither queued nor in the cache (%s)", len(unknown), waitNames(unknown)))
		}
		return &exitError{code: 1, msg: fmt.Sprintf("%d of %d path(s) will not reach the cache: %s", len(failed)+len(unknown), len(paths), strings.Join(parts, ", "))}
	}
	fmt.Fprintf(out, "%d path(s) and their closures are in the cache\n", len(paths))
	return nil
}

// describeWait says where a path still missing stands.
func describeWait(w protocol.PathWait) string {
	switch w.State {
	case protocol.WaitUploading:
		return fmt.Sprintf("uploading (job %d)", w.Job)
	case protocol.WaitReady:
		return fmt.Sprintf("queued (job %d)", w.Job)
	case protocol.WaitRetrying:
		return fmt.Sprintf("retrying (job %d): %s", w.Job, oneLine(w.Error))
	case protocol.WaitSpooled:
		return "spooled by the hook, not imported yet"
	case protocol.WaitChecking:
		return "cannot ask the cache: " + oneLine(w.Error)
	}
	return w.State
}

// waitNames names a few paths (by their base name) for a one-line message.
func waitNames(ws []protocol.PathWait) string {
	const shown = 3
	var names []string
	for i, w := range ws {
		if i == shown {
			names = append(names, fmt.Sprintf("and %d more", len(ws)-shown))
			break
		}
		names = append(names, filepath.Base(w.Path))
	}
	return strings.Join(names, ", ")
}

// cmdAudit has agentd audit its cache. Progress goes to stderr when that
// is a terminal.
func cmdAudit(c *client, args []string, out io.Writer) error {
	fs := subFlags("audit", "[--deep] [--trusted-public-keys 'NAME:KEY …'] [--json]")
	deep := fs.Bool("deep", false, "also download every NAR and check FileHash, NarHash and NarSize")
	keys := fs.String("trusted-public-keys", "", "require every narinfo to be signed by one of these keys")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req := &protocol.Request{Op: protocol.OpAudit, Deep: *deep}
	if *keys != "" {
		req.Keys = []string{*keys}
	}
	var onProgress func(*protocol.Progress)
	if isTerminal(os.Stderr) {
		onProgress = func(p *protocol.Progress) {
			fmt.Fprintf(os.Stderr, "\raudit: %d/%d %s checked", p.Done, p.Total, p.Stage)
		}
	} else {
		onProgress = func(*protocol.Progress) {}
	}
	resp, err := protocol.CallStream(c.socket, req, c.timeout, onProgress)
	if isTerminal(os.Stderr) {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
	if err != nil {
		return c.explain(err)
	}
	if !resp.OK {
		return errors.New(resp.Error)
	}
	var rep audit.Report
	if err := json.Unmarshal(resp.Result, &rep); err != nil {
		return fmt.Errorf("audit report: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(&rep); err != nil {
			return err
		}
	} else if err := rep.Write(out); err != nil {
		return err
	}
	if !rep.OK() {
		return &exitError{code: 1}
	}
	return nil
}

func parseID(fs *flag.FlagSet) (uint64, error) {
	if fs.NArg() != 1 {
		return 0, &exitError{code: 2, msg: fs.Name() + ": need exactly one job ID"}
	}
	id, err := strconv.ParseUint(fs.Arg(0), 10, 64)
	if err != nil || id == 0 {
		return 0, &exitError{code: 2, msg: fmt.Sprintf("%s: %q is not a job ID", fs.Name(), fs.Arg(0))}
	}
	return id, nil
}

func bytesStr(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// now is the clock ages are measured against (tests fix it).
var now = time.Now

func ago(unix int64) string {
	if unix == 0 {
		return "-"
	}
	return now().Sub(time.Unix(unix, 0)).Round(time.Second).String()
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 200 {
		s = s[:197] + "..."
	}
	return s
}
