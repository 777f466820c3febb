// Package hook is the logic of the post-build-hook binary: collect the
// outputs Nix just built, hand them to agentd with a durable acknowledgement,
// and fall back to the spool directory when agentd cannot take them.
//
// It must stay small and must never make a build fail (unless strict mode is
// asked for): Nix blocks its build loop on the hook and fails the build when
// the hook exits non-zero. It links neither bbolt nor an S3 client.
//
// Paths it spools are made garbage-collector roots first (in agentd's roots
// directory, NIXSPOOL_GC_ROOTS), so that a collection before agentd imports
// the spool cannot delete them; agentd removes the roots once the paths are
// uploaded. Floating content-addressed outputs are not known to the hook and
// cannot be rooted before agentd resolves them.
package hook

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nixspool/nixspool/drvhash"
	"github.com/nixspool/nixspool/gcroots"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/spool"
	"github.com/nixspool/nixspool/storepath"
)

// Defaults, overridden by the NIXSPOOL_* environment variables.
const (
	DefaultSocket   = "/run/nixspool/agentd.sock"
	DefaultStateDir = "/var/lib/nixspool"
	DefaultTimeout  = 2 * time.Second
	DefaultGCRoots  = gcroots.DefaultDir
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
	// agentd recorded in the state directory (RootsFile) is used, else
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

// RootsFile, in agentd's state directory, names agentd's GC roots
// directory ("off" when it keeps none), so that the hook roots what it
// spools where agentd will look, whatever agentd's --gc-roots.
const RootsFile = "gc-roots"

// RecordedRoots returns the roots directory agentd recorded in stateDir
// ("" for off), or def if it recorded none.
func RecordedRoots(stateDir, def string) string {
	data, err := os.ReadFile(filepath.Join(stateDir, RootsFile))
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
	rooted := ""
	if !cfg.gcRootsSet {
		cfg.GCRoots = RecordedRoots(cfg.StateDir, cfg.GCRoots)
	}
	if rerr := rootPaths(cfg.GCRoots, paths); rerr != nil {
		rooted = fmt.Sprintf(" (NOT protected from garbage collection: %v)", rerr)
	}
	file, serr := spool.Write(filepath.Join(cfg.StateDir, "spool"), spool.Entry{Paths: paths, Drv: cfg.DrvPath, Floating: floating})
	if serr != nil {
		fmt.Fprintf(stderr, "nixspool: agentd did not take %d path(s) (%v) and spooling failed (%v); they are NOT queued\n", len(paths), err, serr)
		return failStatus(cfg.Strict)
	}
	fmt.Fprintf(stderr, "nixspool: agentd did not take %d path(s) (%v); spooled to %s%s\n", len(paths), err, file, rooted)
	return failStatus(cfg.Strict)
}

// rootPaths makes the store paths among paths GC roots in dir ("": off).
func rootPaths(dir string, paths []string) error {
	var roots []string
	for _, p := range paths {
		if storepath.Check(storepath.DefaultStoreDir, p) == nil {
			roots = append(roots, p)
		}
	}
	if dir == "" || len(roots) == 0 {
		return nil
	}
	r, err := gcroots.New(dir)
	if err != nil {
		return err
	}
	return r.AddAll(roots)
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
