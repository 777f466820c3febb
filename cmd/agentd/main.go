// Command agentd is nixspool's daemon: it takes store paths from the
// post-build hook over a unix socket, keeps them in a durable queue, and
// uploads them (with their closures) to a Nix binary cache.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/nixspool/nixspool/internal/agent"
	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/internal/nixroots"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// defaultedList is a repeatable flag whose default is replaced by the
// first use; an empty value clears the list.
type defaultedList struct {
	vals []string
	set  bool
}

func (d *defaultedList) String() string { return strings.Join(d.vals, ",") }
func (d *defaultedList) Set(v string) error {
	if !d.set {
		d.vals, d.set = nil, true
	}
	if v != "" {
		d.vals = append(d.vals, v)
	}
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		if errors.Is(err, errProblems) {
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "agentd:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) > 0 && args[0] == "audit" {
		return runAudit(args[1:])
	}
	cfg := agent.DefaultConfig()
	fs := flag.NewFlagSet("agentd", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: agentd --secret-key-file FILE [--cache URL] [options]\n       agentd --cache 'URL?secret-key=FILE' [options]\n       agentd audit --cache URL [--deep] [--trusted-public-keys K] [--json]\n\nOptions:")
		fs.PrintDefaults()
	}
	var keys, excludes multiFlag
	skipSigned := &defaultedList{vals: cfg.SkipSignedBy}
	var gcRoots, logFormat, logLevel, pprofAddr, capture string
	fs.StringVar(&cfg.Cache, "cache", "", "binary cache URL as Nix writes it: s3://BUCKET[/PREFIX]?endpoint=http(s)://HOST[:PORT]&region=R&profile=P&compression=zstd|xz|br|gzip|lz4|none&secret-key=FILE… (every parameter of Nix's S3 store; see docs/configuration.md), http(s)://HOST[/PATH]?… (an HTTP binary cache taking PUT) or file:///DIR (default file://STATE-DIR/cache)")
	fs.StringVar(&cfg.NetrcFile, "netrc-file", "", "netrc file with the login and password of an http(s):// cache (default: Nix's, $NIX_CONF_DIR/netrc or /etc/nix/netrc, if it exists)")
	fs.Var(&keys, "secret-key-file", "Nix secret signing key file (repeatable; required unless the cache URL has secret-key= or secret-keys=)")
	fs.BoolVar(&cfg.AllowInsecureKeyPerms, "allow-insecure-key-perms", false, "accept key files readable by group or others")
	fs.StringVar(&cfg.Socket, "socket", cfg.Socket, "unix socket to listen on (ignored when socket-activated)")
	fs.StringVar(&cfg.SocketGroup, "socket-group", "", "group that may connect and queue paths (the socket is 0660)")
	fs.StringVar(&cfg.AdminGroup, "admin-group", "", "group that may also gc, forget, drop, retry, pin and unpin (default: only root and agentd's user); its members reach the socket through --socket-group")
	fs.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "directory for the queue, spool and temp files")
	fs.StringVar(&cfg.StoreDir, "store-dir", cfg.StoreDir, "the Nix store directory")
	fs.StringVar(&cfg.NixDaemonSocket, "nix-daemon-socket", "", "Nix daemon socket (default: $NIX_DAEMON_SOCKET_PATH or /nix/var/nix/daemon-socket/socket; without a daemon, `nix-daemon --stdio` is used)")
	fs.StringVar(&gcRoots, "gc-roots", nixroots.DefaultDir, `directory for GC roots of queued paths, or "off"`)
	fs.IntVar(&cfg.Jobs, "jobs", cfg.Jobs, "jobs (paths handed over) uploaded concurrently; their NARs share one bounded pool")
	fs.IntVar(&cfg.MaxRequests, "max-requests", cfg.MaxRequests, "most requests in flight to the bucket; the window adapts below it (grows with latency, shrinks when the store throttles)")
	fs.BoolVar(&cfg.PaceUploads, "pace-uploads", cfg.PaceUploads, "pace large uploads to an s3:// or http(s):// cache so that the queue they build on the way stays near 15 ms and small paths do not wait behind them (delay-based, like LEDBAT); false sends them as fast as TCP lets")
	fs.IntVar(&cfg.MinRequests, "min-requests", cfg.MinRequests, "fewest requests in flight the window shrinks to")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", cfg.ShutdownGrace, "time in-flight uploads get to finish on SIGTERM")
	fs.IntVar(&cfg.MaxAttempts, "max-attempts", 0, "give up on a job after this many transient failures (0: never)")
	fs.DurationVar(&cfg.BackoffMax, "backoff-max", cfg.BackoffMax, "longest delay between retries of a job")
	fs.DurationVar(&cfg.SpoolInterval, "spool-interval", cfg.SpoolInterval, "how often to import the hook's spool directory")
	fs.DurationVar(&cfg.GenerationInterval, "cache-check-interval", cfg.GenerationInterval, "how often to check that the cache was not reset (its nix-cache-info replaced), forgetting what it held if it was")
	fs.StringVar(&pprofAddr, "pprof-listen", "", "serve Go's pprof profiles on this loopback address (debugging; off by default)")
	fs.Var(&excludes, "exclude", "do not upload paths whose name (after the hash) matches this regular expression (repeatable)")
	fs.Int64Var(&cfg.MaxNARSize, "max-nar-size", 0, "do not upload paths whose NAR is larger than this many bytes (0: no limit)")
	fs.Var(skipSigned, "skip-signed-by", `do not upload paths already signed by this key name (repeatable; "" for none)`)
	fs.BoolVar(&cfg.BuildClosures, "build-closures", false, "for every build the hook hands over, also upload what the build needed that is in the store: the derivation's closure (sources, .drv files) and the outputs of its input derivations (as agentctl push --build-closure)")
	fs.StringVar(&capture, "capture", string(cfg.Capture), "which paths are uploaded besides those the hook and agentctl push hand over: hook (none), local (also every path built or added on this machine: sources, nix-store --add, builds the hook missed), all (also substituted and copied-in paths); --skip-signed-by applies in every mode")
	fs.DurationVar(&cfg.CaptureInterval, "capture-interval", cfg.CaptureInterval, "how often the store watcher (--capture local|all) looks for new valid paths")
	fs.BoolVar(&cfg.CaptureExisting, "capture-existing", cfg.CaptureExisting, "at the store watcher's first start, also queue the paths already in the store (false: only those that become valid from then on)")
	fs.StringVar(&cfg.NixDBDir, "nix-db-dir", cfg.NixDBDir, "directory of the Nix database the store watcher reads (read-only)")
	fs.BoolVar(&cfg.UploadBuildLogs, "upload-build-logs", false, "also upload the build log of each uploaded path's derivation (log/<drv>, read by `nix-store --store CACHE --read-log DRV`)")
	fs.DurationVar(&cfg.GCPollInterval, "gc-poll-interval", cfg.GCPollInterval, "how often to read garbage-collection announcements; a collector's --grace must exceed twice this plus its margin")
	fs.Var(cachegc.DurationFlag{D: &cfg.GCInterval}, "gc-interval", "run a garbage collection cycle this often, e.g. 7d (0: never; see also agentctl gc)")
	fs.Var(cachegc.DurationFlag{D: &cfg.GCKeepSince}, "gc-keep-since", "scheduled gc: keep paths written within this time (and their closures), e.g. 30d")
	fs.Var(cachegc.DurationFlag{D: &cfg.GCGrace}, "gc-grace", "scheduled gc: time between announcing deletions and deleting, e.g. 2h")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9443; off by default)")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	cfg.SecretKeyFiles = keys
	cfg.Excludes = excludes
	cfg.SkipSignedBy = skipSigned.vals
	cfg.Capture = agent.CaptureMode(capture)
	if gcRoots != "off" {
		cfg.GCRootsDir = gcRoots
	}
	logger, err := newLogger(logFormat, logLevel)
	if err != nil {
		return err
	}
	cfg.Logger = logger

	// A soft memory limit makes the GC work harder before the heap (mostly
	// zstd's block buffers while a large NAR streams) doubles, keeping the
	// resident set bounded. GOMEMLIMIT in the environment overrides it.
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(128 << 20)
	}
	signal.Ignore(syscall.SIGPIPE)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	ctx, cancel := context.WithCancel(context.Background())
	abort := make(chan struct{})
	go func() {
		s := <-sigs
		logger.Info("signal received; stopping", "signal", s.String())
		cancel()
		<-sigs
		close(abort)
	}()

	if pprofAddr != "" {
		if err := servePprof(pprofAddr, logger); err != nil {
			return err
		}
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	return a.Run(ctx, abort)
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// servePprof serves net/http/pprof on a loopback address only.
func servePprof(addr string, log *slog.Logger) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--pprof-listen: %w", err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("--pprof-listen %q: only loopback addresses are allowed", addr)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--pprof-listen: %w", err)
	}
	log.Info("serving pprof", "addr", l.Addr().String())
	go http.Serve(l, nil) // pprof registers on the default mux
	return nil
}
