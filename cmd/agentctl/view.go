package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixspool/nixspool/protocol"
)

// sourcesLine lists counts by source, in a fixed order.
func sourcesLine(by map[string]int) string {
	var parts []string
	for _, src := range []string{"hook", "push", "capture", "build-closure", "unknown"} {
		if n := by[src]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, src))
		}
	}
	return strings.Join(parts, ", ")
}

// renderStatus writes the human status view.
func renderStatus(out io.Writer, s *protocol.Status) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	reach := "reachability unknown"
	if s.CacheReachable != nil {
		reach = map[bool]string{true: "reachable", false: "UNREACHABLE"}[*s.CacheReachable]
	}
	fmt.Fprintf(w, "agentd\t%s, up %s\n", s.Version, (time.Duration(s.UptimeSeconds) * time.Second).String())
	fmt.Fprintf(w, "cache\t%s (%s)\n", s.Cache, reach)
	fmt.Fprintf(w, "queue\t%d pending, %d uploading, %d retrying, %d failed\n", s.Pending, s.Uploading, s.Retrying, s.Failed)
	if len(s.QueuedBySource) > 0 {
		fmt.Fprintf(w, "queued from\t%s\n", sourcesLine(s.QueuedBySource))
	}
	if c := s.Capture; c != nil {
		if c.Error != "" {
			fmt.Fprintf(w, "capture\t%s: OFF: %s\n", c.Mode, c.Error)
		} else {
			fmt.Fprintf(w, "capture\t%s: %d paths queued since start, cursor %d\n", c.Mode, c.Captured, c.Cursor)
		}
	}
	if s.Spooled.Files > 0 {
		fmt.Fprintf(w, "spooled\t%d request(s), %d paths, not queued yet (agentd imports the spool periodically)\n", s.Spooled.Files, s.Spooled.Paths)
	}
	if s.OldestPendingSeconds > 0 {
		fmt.Fprintf(w, "oldest pending\t%s\n", (time.Duration(s.OldestPendingSeconds) * time.Second).String())
	}
	fmt.Fprintf(w, "uploaded\t%d jobs, %d paths, %s NAR, %s sent", s.Uploaded, s.UploadedPaths, bytesStr(s.UploadedNARBytes), bytesStr(s.UploadedFileBytes))
	if s.UploadedRealisations > 0 {
		fmt.Fprintf(w, ", %d realisations", s.UploadedRealisations)
	}
	if s.Skipped > 0 {
		fmt.Fprintf(w, ", %d paths skipped by filters", s.Skipped)
	}
	fmt.Fprintln(w)
	if t := s.TimeToCache; t.Paths > 0 {
		fmt.Fprintf(w, "time to cache\tp50 %s, p99 %s (%d paths, last 15 min)\n", protocol.Seconds(t.P50Seconds), protocol.Seconds(t.P99Seconds), t.Paths)
	} else {
		fmt.Fprintf(w, "time to cache\t- (no path done in the last 15 min)\n")
	}
	fmt.Fprintf(w, "rate (1 min)\t%.1f paths/s, %.1f MB/s\n", s.RatePathsPerSecond, s.RateNARBytesPerSec/1e6)
	fmt.Fprintf(w, "requests\t%d in flight, window %d (adapts to the store's latency and throttling)\n", s.RequestsInFlight, s.RequestWindow)
	fmt.Fprintf(w, "known in cache\t%d paths\n", s.KnownPresent)
	// The largest uploads first; many small ones are summed up.
	ups := append([]protocol.Upload(nil), s.InProgress...)
	sort.Slice(ups, func(i, j int) bool { return ups[i].BytesSize > ups[j].BytesSize })
	for i, u := range ups {
		if i == maxShownUploads && len(ups) > maxShownUploads+1 {
			fmt.Fprintf(w, "uploading\t… and %d smaller\n", len(ups)-i)
			break
		}
		fmt.Fprintf(w, "uploading\t%s %s\n", progressBar(u.BytesDone, u.BytesSize, 24), filepath.Base(u.Path))
	}
	if s.LastError != "" {
		fmt.Fprintf(w, "last error\t%s ago: %s\n", ago(s.LastErrorAt), oneLine(s.LastError))
	}
	if s.NextRetryAt > 0 {
		fmt.Fprintf(w, "next retry\tin %s\n", max(time.Unix(s.NextRetryAt, 0).Sub(now()), 0).Round(time.Second))
	}
	if s.StateDirError != "" {
		fmt.Fprintf(w, "STATE DIR ERROR\t%s\n", oneLine(s.StateDirError))
	}
	return w.Flush()
}

// maxShownUploads bounds the uploads listed one per line.
const maxShownUploads = 8

// progressBar renders "[#####.....]  45% 12.0 MiB / 26.5 MiB".
func progressBar(done, total int64, width int) string {
	frac := 0.0
	if total > 0 {
		frac = min(float64(done)/float64(total), 1)
	}
	n := int(frac * float64(width))
	return fmt.Sprintf("[%s%s] %3.0f%% %s / %s", strings.Repeat("#", n), strings.Repeat(".", width-n), frac*100,
		bytesStr(uint64(done)), bytesStr(uint64(total)))
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// cmdWatch refreshes the status view in place on a terminal, or prints one
// summary line per change when piped, until interrupted.
func cmdWatch(c *client, args []string, out io.Writer) error {
	fs := subFlags("watch", "[--interval D]")
	interval := fs.Duration("interval", time.Second, "refresh interval")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	tty := out == os.Stdout && isTerminal(os.Stdout)
	if tty {
		fmt.Fprint(out, "\x1b[?25l") // hide the cursor while redrawing
		defer fmt.Fprint(out, "\x1b[?25h\n")
	}
	last := ""
	for {
		resp, err := c.call(&protocol.Request{Op: protocol.OpStatus})
		if err != nil {
			return err
		}
		if tty {
			var b strings.Builder
			renderStatus(&b, resp.Status)
			fmt.Fprintf(out, "\x1b[H\x1b[2J%s\n(%s; Ctrl-C to quit)", b.String(), time.Now().Format("15:04:05"))
		} else {
			line := protocol.Summary(resp.Status)
			for _, u := range resp.Status.InProgress {
				line += fmt.Sprintf("; %s %s", filepath.Base(u.Path), progressBar(u.BytesDone, u.BytesSize, 10))
			}
			if line != last {
				fmt.Fprintf(out, "%s %s\n", time.Now().Format(time.RFC3339), line)
				last = line
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(*interval):
		}
	}
}

// cmdDoctor checks the socket here and asks agentd to check the rest.
func cmdDoctor(c *client, args []string, out io.Writer) error {
	fs := subFlags("doctor", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var checks []protocol.Check
	if fi, err := os.Stat(c.socket); err != nil {
		checks = append(checks, protocol.Check{Name: "socket", Status: "fail", Detail: err.Error(), Hint: "is agentd (or nixspool.socket) running? is --socket right?"})
	} else if fi.Mode().Perm()&0o002 != 0 {
		checks = append(checks, protocol.Check{Name: "socket", Status: "fail", Detail: fmt.Sprintf("%s is world-writable (%v)", c.socket, fi.Mode().Perm()), Hint: "any local user could queue paths; use SocketMode=0660"})
	} else {
		st := fi.Sys().(*syscall.Stat_t)
		checks = append(checks, protocol.Check{Name: "socket", Status: "ok", Detail: fmt.Sprintf("%s mode %04o, uid %d gid %d", c.socket, fi.Mode().Perm(), st.Uid, st.Gid)})
	}
	if checks[0].Status == "ok" {
		resp, err := c.call(&protocol.Request{Op: protocol.OpDoctor})
		if err != nil {
			checks = append(checks, protocol.Check{Name: "agentd", Status: "fail", Detail: err.Error(), Hint: "start agentd, or check that you may use its socket (root or the socket's group)"})
		} else {
			checks = append(checks, resp.Checks...)
		}
	}
	failed := 0
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	for _, ch := range checks {
		mark := map[string]string{"ok": "ok", "warn": "WARN", "fail": "FAIL"}[ch.Status]
		fmt.Fprintf(w, "%s\t%s\t%s\n", mark, ch.Name, ch.Detail)
		if ch.Hint != "" && ch.Status != "ok" {
			fmt.Fprintf(w, "\t\thint: %s\n", ch.Hint)
		}
		if ch.Status == "fail" {
			failed++
		}
	}
	w.Flush()
	if failed > 0 {
		return &exitError{code: 1, msg: fmt.Sprintf("%d check(s) failed", failed)}
	}
	return nil
}
