// Package hook is the logic of the post-build-hook binary: collect the
// outputs Nix just built, hand them to agentd with a durable acknowledgement,
// and fall back to the spool directory when agentd cannot take them.
//
// It must stay small and must never make a build fail (unless strict mode is
// asked for): Nix fails the build when the hook exits non-zero, and waits
// for it. Up to Nix 2.34 the hook runs synchronously and blocks Nix's whole
// build loop; since 2.35 it runs asynchronously, up to max-jobs hooks at
// once, and only the builds that depend on the hooked outputs wait for it.
// Either way its latency is on the build's critical path, and since 2.35
// many hooks start together: it links neither bbolt, an S3 client nor
// package net (which would link the C library and slow every start).
//
// Paths it spools are made garbage-collector roots first (in agentd's roots
// directory, NIXSPOOL_GC_ROOTS), so that a collection before agentd imports
// the spool cannot delete them; agentd removes the roots once the paths are
// uploaded. The derivation is rooted too (agentd reads it for the
// realisations), and so are floating content-addressed outputs, which have
// no path in the derivation: the hook asks the Nix daemon for them before it
// spools. The hook holds the roots directory's lock from rooting until the
// spool file is in place, so that agentd never removes a root it found in
// place before agentd can see the spool file that needs it.
package hook

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nixspool/nixspool/drvhash"
	"github.com/nixspool/nixspool/internal/nixroots"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/statedir"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storepath"
)

// Defaults, overridden by the NIXSPOOL_* environment variables.
const (
	DefaultSocket   = "/run/nixspool/agentd.sock"
	DefaultStateDir = "/var/lib/nixspool"
	DefaultTimeout  = 2 * time.Second
	DefaultGCRoots  = nixroots.DefaultDir
)

// Config is what the hook reads from its environment.
type Config struct {
	OutPaths string // OUT_PATHS, space separated
	DrvPath  string // DRV_PATH
	Socket   string
	StateDir string
	Timeout  time.Duration
	Strict   bool
	// gcRootsSet: NIXSPOOL_GC_ROOTS was given; otherwise the directory
	// agentd recorded in the state directory (statedir.Dir.Roots) is used, else
	// DefaultGCRoots.
	gcRootsSet bool
	// GCRoots is agentd's GC roots directory, where spooled paths are
	// rooted ("" when NIXSPOOL_GC_ROOTS=off).
	GCRoots string
	// Warnings are configuration problems that do not stop the hook.
	Warnings []string
}

// ConfigFromEnv reads the hook's configuration from the environment.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	c := Config{
		OutPaths: getenv("OUT_PATHS"),
		DrvPath:  getenv("DRV_PATH"),
		Socket:   or(getenv("NIXSPOOL_SOCKET"), DefaultSocket),
		StateDir: or(getenv("NIXSPOOL_STATE_DIR"), DefaultStateDir),
		Timeout:  DefaultTimeout,
		Strict:   getenv("NIXSPOOL_STRICT") == "1",
		GCRoots:  DefaultGCRoots,
	}
	r := getenv("NIXSPOOL_GC_ROOTS")
	c.gcRootsSet = r != ""
	switch {
	case r == "":
	case r == "off":
		c.GCRoots = ""
	case filepath.IsAbs(r):
		c.GCRoots = filepath.Clean(r)
	default:
		c.GCRoots = ""
		c.Warnings = append(c.Warnings, fmt.Sprintf("NIXSPOOL_GC_ROOTS=%q: want an absolute directory or \"off\"; spooled paths are not rooted", r))
	}
	if s := getenv("NIXSPOOL_TIMEOUT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return c, fmt.Errorf("NIXSPOOL_TIMEOUT=%q: want a positive duration such as 2s", s)
		}
		c.Timeout = d
	}
	return c, nil
}

// RecordedRoots returns the roots directory agentd recorded in stateDir
// ("" for off), or def if it recorded none.
func RecordedRoots(stateDir, def string) string {
	data, err := os.ReadFile(statedir.Dir(stateDir).Roots())
	if err != nil {
		return def
	}
	switch r := strings.TrimSpace(string(data)); {
	case r == "off":
		return ""
	case filepath.IsAbs(r):
		return filepath.Clean(r)
	}
	return def
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// Run does the hook's work and returns the process exit status.
func Run(getenv func(string) string, stderr io.Writer) int {
	cfg, err := ConfigFromEnv(getenv)
	if err != nil {
		fmt.Fprintf(stderr, "nixspool: %v\n", err)
		return failStatus(cfg.Strict)
	}
	for _, w := range cfg.Warnings {
		fmt.Fprintf(stderr, "nixspool: %s\n", w)
	}
	paths, floating, drvErr := Outputs(cfg.OutPaths, cfg.DrvPath)
	if len(paths) == 0 && !floating {
		if drvErr != nil {
			fmt.Fprintf(stderr, "nixspool: no outputs to queue: %v\n", drvErr)
			return failStatus(cfg.Strict)
		}
		return 0
	}
	// Floating content-addressed outputs have no path in the .drv; agentd
	// asks the Nix daemon for the realised paths.
	req := &protocol.Request{Op: protocol.OpEnqueue, Paths: paths, Drv: cfg.DrvPath, Floating: floating}
	resp, err := protocol.Call(cfg.Socket, req, cfg.Timeout)
	if err == nil && resp.OK {
		return 0
	}
	if err == nil {
		err = errors.New(resp.Error)
	}
	// Root first: a spooled path is never without a root.
	if !cfg.gcRootsSet {
		cfg.GCRoots = RecordedRoots(cfg.StateDir, cfg.GCRoots)
	}
	entry := spool.Entry{Paths: paths, Drv: cfg.DrvPath, Floating: floating}
	unlock, notes := rootForSpool(cfg, &entry)
	file, serr := spool.Write(statedir.Dir(cfg.StateDir).Spool(), entry)
	unlock()
	if serr != nil {
		fmt.Fprintf(stderr, "nixspool: agentd did not take %d path(s) (%v) and spooling failed (%v); they are NOT queued\n", len(entry.Paths), err, serr)
		return failStatus(cfg.Strict)
	}
	fmt.Fprintf(stderr, "nixspool: agentd did not take %d path(s) (%v); spooled to %s%s\n", len(entry.Paths), err, file, notes)
	return failStatus(cfg.Strict)
}

// rootForSpool makes the paths of the request e about to be spooled GC roots
// in cfg.GCRoots, with its derivation, and adds the realised floating
// outputs of the derivation to e's paths. It takes the roots directory's
// lock shared and returns the function that releases it, to be called once
// the spool file is written. notes says what could not be done.
func rootForSpool(cfg Config, e *spool.Entry) (unlock func(), notes string) {
	unlock = func() {}
	if e.Floating && e.Drv != "" {
		outs, err := floatingOutputs(e.Drv, cfg.Timeout)
		if err != nil {
			// agentd resolves them at import, if the derivation is still
			// there.
			notes += fmt.Sprintf(" (floating outputs unknown, NOT protected from garbage collection: %v)", err)
		}
		e.Paths = union(e.Paths, outs)
	}
	if cfg.GCRoots == "" {
		return unlock, notes
	}
	var roots []string
	for _, p := range append(slices.Clone(e.Paths), e.Drv) {
		if p != "" && storepath.Check(storepath.DefaultStoreDir, p) == nil {
			roots = append(roots, p)
		}
	}
	if len(roots) == 0 {
		return unlock, notes
	}
	r, err := nixroots.New(cfg.GCRoots)
	if err == nil {
		var uerr error
		if unlock, uerr = r.Lock(false, cfg.Timeout); uerr != nil {
			// Rooting anyway: agentd spares roots younger than a minute.
			unlock = func() {}
			notes += fmt.Sprintf(" (rooted without the roots lock: %v)", uerr)
		}
		err = r.AddAll(roots)
	}
	if err != nil {
		notes += fmt.Sprintf(" (NOT protected from garbage collection: %v)", err)
	}
	return unlock, notes
}

// floatingOutputs asks the Nix daemon (found as Nix finds it) for the
// realised outputs of drv.
func floatingOutputs(drv string, timeout time.Duration) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st := nixstore.Open(nixstore.Options{MaxConns: 1})
	defer st.Close()
	m, err := st.QueryDerivationOutputMap(ctx, drv)
	if err != nil {
		return nil, err
	}
	var outs []string
	for _, p := range m {
		if p != "" {
			outs = append(outs, p)
		}
	}
	return outs, nil
}

// union returns a with the elements of b it lacks appended, sorted.
func union(a, b []string) []string {
	for _, p := range b {
		if !slices.Contains(a, p) {
			a = append(a, p)
		}
	}
	sort.Strings(a)
	return a
}

func failStatus(strict bool) int {
	if strict {
		return 1
	}
	return 0
}

// Outputs returns the existing output paths of the build: those listed in
// outPaths plus every output recorded in the derivation at drvPath (Nix
// 2.8.0 leaves OUT_PATHS empty, and 2.8.1–2.15 list only the wanted
// outputs). Floating content-addressed outputs have no path in the .drv:
// floating reports that there are some, for agentd to resolve. The error
// reports a derivation that could not be read.
func Outputs(outPaths, drvPath string) (paths []string, floating bool, err error) {
	set := map[string]bool{}
	for _, p := range strings.Fields(outPaths) {
		set[p] = true
	}
	var drvErr error
	if drvPath != "" {
		// drvhash reads every kind of output (go-nix refuses deferred
		// and multi-output floating ones).
		b, err := os.ReadFile(drvPath)
		if err == nil {
			var drv *drvhash.Derivation
			drv, err = drvhash.Parse(b)
			if err == nil {
				for _, o := range drv.Outputs {
					if o.Path != "" {
						set[o.Path] = true
					} else {
						floating = true
					}
				}
			}
		}
		if err != nil {
			drvErr = fmt.Errorf("read derivation %s: %w", drvPath, err)
		}
	}
	for p := range set {
		if _, err := os.Lstat(p); err == nil {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	return paths, floating, drvErr
}
