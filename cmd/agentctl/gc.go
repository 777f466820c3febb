package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/protocol"
)

// progressPrinter shows a long operation's progress: in place on a
// terminal, else one line per stage (for logs).
func progressPrinter(what string) (func(*protocol.Progress), func()) {
	if isTerminal(os.Stderr) {
		return func(p *protocol.Progress) {
				line := what + ": " + p.Stage
				switch {
				case p.Stage == cachegc.StageGrace:
					line += fmt.Sprintf(" %ds of %ds before deleting", p.Done, p.Total)
				case p.Total > 0:
					line += fmt.Sprintf(" %d/%d", p.Done, p.Total)
				case p.Done > 0:
					line += fmt.Sprintf(" %d", p.Done)
				}
				fmt.Fprintf(os.Stderr, "\r\033[K%s", line)
			}, func() {
				fmt.Fprint(os.Stderr, "\r\033[K")
			}
	}
	last := ""
	return func(p *protocol.Progress) {
		if p.Stage != last {
			last = p.Stage
			fmt.Fprintf(os.Stderr, "%s: %s\n", what, p.Stage)
		}
	}, func() {}
}

// cmdGC has agentd run one garbage collection cycle.
func cmdGC(c *client, args []string, out io.Writer) error {
	fs := subFlags("gc", "--keep-since DURATION --grace DURATION [--dry-run] [--list] [--json]")
	keepSince := fs.String("keep-since", "", "keep every path written (or re-written) within this time, with its closure (e.g. 30d, 720h)")
	grace := fs.String("grace", "", "announce deletions this long before deleting (e.g. 2h; every agent must read announcements well within it)")
	dry := fs.Bool("dry-run", false, "print what would be deleted and the bytes freed; delete nothing")
	list := fs.Bool("list", false, "print every key deleted")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *keepSince == "" || *grace == "" || fs.NArg() > 0 {
		return &exitError{code: 2, msg: "gc: --keep-since and --grace are required (e.g. agentctl gc --keep-since 30d --grace 2h)"}
	}
	ks, err := cachegc.ParseDuration(*keepSince)
	if err != nil {
		return &exitError{code: 2, msg: "gc: --keep-since " + err.Error()}
	}
	gr, err := cachegc.ParseDuration(*grace)
	if err != nil || gr <= 0 {
		return &exitError{code: 2, msg: fmt.Sprintf("gc: --grace %q: want a positive duration such as 2h", *grace)}
	}
	show, clear := progressPrinter("gc")
	resp, err := protocol.CallStream(c.socket, &protocol.Request{Op: protocol.OpGC, KeepSince: ks, Grace: gr, DryRun: *dry}, c.timeout, show)
	clear()
	if err != nil {
		return c.explain(err)
	}
	var rep cachegc.Report
	if len(resp.Result) > 0 {
		if err := json.Unmarshal(resp.Result, &rep); err != nil {
			return fmt.Errorf("gc report: %w", err)
		}
	}
	if len(resp.Result) > 0 {
		if *asJSON {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			if err := enc.Encode(&rep); err != nil {
				return err
			}
		} else {
			if rep.DryRun {
				for _, p := range rep.Paths {
					fmt.Fprintln(out, "would delete", p)
				}
			}
			if *list {
				for _, k := range rep.Keys {
					fmt.Fprintln(out, "deleted", k)
				}
			}
			for _, w := range rep.Warnings {
				fmt.Fprintln(out, "warning:", w)
			}
			if rep.Complete || rep.Objects > 0 { // it got as far as the mark
				fmt.Fprintln(out, rep.Summary())
			}
		}
	}
	if !resp.OK {
		return errors.New(resp.Error)
	}
	return nil
}

// cmdPin names a root.
func cmdPin(c *client, args []string, out io.Writer) error {
	fs := subFlags("pin", "NAME PATH")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return &exitError{code: 2, msg: "pin: need a name and a store path (agentctl pin NAME PATH)"}
	}
	p := fs.Arg(1)
	if abs, err := filepath.Abs(p); err == nil && !strings.HasPrefix(abs, "/nix/store/") {
		if real, err := filepath.EvalSymlinks(abs); err == nil && strings.HasPrefix(real, "/nix/store/") {
			p = real // ./result
		}
	}
	show, clear := progressPrinter("pin")
	resp, err := protocol.CallStream(c.socket, &protocol.Request{Op: protocol.OpPin, Name: fs.Arg(0), Paths: []string{p}}, c.timeout, show)
	clear()
	if err != nil {
		return c.explain(err)
	}
	if !resp.OK {
		return errors.New(resp.Error)
	}
	fmt.Fprintf(out, "pinned %s: %s\n", fs.Arg(0), p)
	return nil
}

// cmdUnpin removes a pin.
func cmdUnpin(c *client, args []string, out io.Writer) error {
	fs := subFlags("unpin", "NAME")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return &exitError{code: 2, msg: "unpin: need the pin's name"}
	}
	resp, err := c.call(&protocol.Request{Op: protocol.OpUnpin, Name: fs.Arg(0)})
	if err != nil {
		return err
	}
	var pin cachegc.Pin
	json.Unmarshal(resp.Result, &pin)
	fmt.Fprintf(out, "unpinned %s (was %s)\n", pin.Name, pin.Path)
	return nil
}

// cmdPins lists the pins.
func cmdPins(c *client, args []string, out io.Writer) error {
	fs := subFlags("pins", "[--json]")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	resp, err := c.call(&protocol.Request{Op: protocol.OpPins})
	if err != nil {
		return err
	}
	var pins []cachegc.Pin
	if err := json.Unmarshal(resp.Result, &pins); err != nil {
		return fmt.Errorf("pins: %w", err)
	}
	if *asJSON {
		return json.NewEncoder(out).Encode(pins)
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tWRITTEN\tPATH")
	for _, p := range pins {
		fmt.Fprintf(w, "%s\t%s\t%s\n", p.Name, p.Written.Local().Format(time.DateTime), p.Path)
	}
	return w.Flush()
}
