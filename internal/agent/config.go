// Package agent is agentd: it accepts store paths on a unix socket, keeps
// them in the durable queue, and drains the queue into the binary cache with
// retries. cmd/agentd only parses flags into a Config and calls Run.
package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/storewatch"
	"github.com/nixspool/nixspool/storepath"
)

// Version is set at build time (-ldflags -X).
var Version = "dev"

// Config is agentd's configuration.
type Config struct {
	Cache                 string        // cache URL; "" = file://<StateDir>/cache
	NetrcFile             string        // credentials of an http(s):// cache; "" = Nix's default netrc file, if any
	SecretKeyFiles        []string      // at least one, here or in the cache URL (secret-key=, secret-keys=)
	AllowInsecureKeyPerms bool          // accept key files readable by group/others
	Socket                string        // unix socket to listen on (unless socket-activated)
	SocketGroup           string        // group allowed to connect and enqueue ("" = agentd's own)
	AdminGroup            string        // group allowed to gc, forget, drop, retry, pin, unpin ("" = root and agentd's user only)
	StateDir              string        // queue.db, spool/, tmp/
	StoreDir              string        // the Nix store
	NixDaemonSocket       string        // "" = as Nix finds it, else `nix-daemon --stdio`
	GCRootsDir            string        // "" = GC roots off
	Jobs                  int           // jobs uploaded concurrently
	MinRequests           int           // lower bound of the adaptive request window
	MaxRequests           int           // upper bound of requests in flight to the bucket
	PaceUploads           bool          // pace large uploads by the queueing delay small requests see (s3, http caches)
	GenerationInterval    time.Duration // how often to check that the cache was not reset
	ShutdownGrace         time.Duration // how long in-flight uploads may finish on SIGTERM
	MaxAttempts           int           // 0 = retry transient errors forever
	BackoffInitial        time.Duration
	BackoffMax            time.Duration
	SpoolInterval         time.Duration
	Excludes              []string // regular expressions on the store path name (after "<hash>-")
	MaxNARSize            int64    // 0 = no limit
	SkipSignedBy          []string // key names: paths signed by one of them are not uploaded
	MetricsListen         string   // "" = no metrics endpoint
	UploadBuildLogs       bool     // also upload log/<drv> for uploaded paths
	// Capture: which paths reach the queue besides the hook's and pushes'
	// (see CaptureMode); the store watcher reads NixDBDir every
	// CaptureInterval.
	// BuildClosures: for every derivation the hook hands over, also queue
	// its build closure (see Agent.buildClosure).
	BuildClosures   bool
	Capture         CaptureMode
	CaptureInterval time.Duration
	// CaptureExisting: at the watcher's first start (no cursor yet), also
	// queue the paths already in the store; otherwise start at its top.
	CaptureExisting bool
	NixDBDir        string
	// Garbage collection: how often announcements are read (every agent),
	// and an optional schedule of cycles run by this agent (0: none).
	GCPollInterval time.Duration
	GCInterval     time.Duration
	GCKeepSince    time.Duration
	GCGrace        time.Duration
	Logger         *slog.Logger
}

// Defaults.
const (
	DefaultSocket   = "/run/nixspool/agentd.sock"
	DefaultStateDir = "/var/lib/nixspool"
)

// DefaultConfig returns a Config with every default filled in.
func DefaultConfig() Config {
	return Config{
		Socket:             DefaultSocket,
		StateDir:           DefaultStateDir,
		StoreDir:           storepath.DefaultStoreDir,
		Jobs:               64,
		MinRequests:        2,
		MaxRequests:        128,
		PaceUploads:        true,
		GenerationInterval: 30 * time.Second,
		ShutdownGrace:      30 * time.Second,
		BackoffInitial:     time.Second,
		BackoffMax:         10 * time.Minute,
		SpoolInterval:      5 * time.Second,
		SkipSignedBy:       []string{"cache.nixos.org-1"},
		Capture:            CaptureHook,
		CaptureInterval:    time.Second,
		CaptureExisting:    true,
		NixDBDir:           storewatch.DefaultDir,
		GCPollInterval:     20 * time.Second,
		GCKeepSince:        30 * 24 * time.Hour,
		GCGrace:            2 * time.Hour,
	}
}

// parsedConfig is a Config that parse checked, with the values it parsed
// on the way: New works from these, and parses nothing again.
type parsedConfig struct {
	Config
	cache    *cacheurl.Cache  // Config.Cache
	excludes []*regexp.Regexp // Config.Excludes
}

// Validate checks the configuration and fills in derived defaults.
func (c *Config) Validate() error {
	_, err := c.parse()
	return err
}

// parse is Validate, returning what it parsed.
func (c *Config) parse() (parsedConfig, error) {
	var errs []error
	if c.Cache == "" {
		c.Cache = "file://" + filepath.Join(c.StateDir, "cache")
	}
	cache, err := cacheurl.Parse(c.Cache)
	if err != nil {
		errs = append(errs, fmt.Errorf("--cache: %w", err))
	}
	if len(c.SecretKeyFiles) == 0 && (cache == nil || len(cache.SecretKeyFiles) == 0) {
		errs = append(errs, errors.New("--secret-key-file: at least one signing key is required, here or as secret-key= in the cache URL (create one with `nix key generate-secret --key-name NAME`)"))
	}
	if c.NetrcFile != "" && !filepath.IsAbs(c.NetrcFile) {
		errs = append(errs, fmt.Errorf("--netrc-file %q: must be absolute", c.NetrcFile))
	}
	if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("--state-dir %q: must be absolute", c.StateDir))
	}
	if !filepath.IsAbs(c.Socket) {
		errs = append(errs, fmt.Errorf("--socket %q: must be absolute", c.Socket))
	}
	if c.StoreDir != storepath.DefaultStoreDir {
		errs = append(errs, fmt.Errorf("--store-dir %q: only %s is supported", c.StoreDir, storepath.DefaultStoreDir))
	}
	if c.GCRootsDir != "" && !filepath.IsAbs(c.GCRootsDir) {
		errs = append(errs, fmt.Errorf("--gc-roots %q: want an absolute directory or \"off\"", c.GCRootsDir))
	}
	if c.Jobs < 1 || c.Jobs > 256 {
		errs = append(errs, fmt.Errorf("--jobs %d: want 1 to 256", c.Jobs))
	}
	if c.MinRequests < 1 || c.MaxRequests < c.MinRequests || c.MaxRequests > 1024 {
		errs = append(errs, fmt.Errorf("--min-requests %d / --max-requests %d: want 1 ≤ min ≤ max ≤ 1024", c.MinRequests, c.MaxRequests))
	}
	if c.GenerationInterval <= 0 {
		c.GenerationInterval = 30 * time.Second
	}
	if c.ShutdownGrace < 0 {
		errs = append(errs, errors.New("--shutdown-grace: must not be negative"))
	}
	if c.MaxAttempts < 0 {
		errs = append(errs, errors.New("--max-attempts: must not be negative"))
	}
	if c.BackoffInitial <= 0 || c.BackoffMax < c.BackoffInitial {
		errs = append(errs, errors.New("--backoff-max: must be at least the initial backoff (1s)"))
	}
	var excludes []*regexp.Regexp
	for _, e := range c.Excludes {
		re, err := regexp.Compile(e)
		if err != nil {
			errs = append(errs, fmt.Errorf("--exclude %q: %w", e, err))
		}
		excludes = append(excludes, re)
	}
	if c.MaxNARSize < 0 {
		errs = append(errs, errors.New("--max-nar-size: must not be negative"))
	}
	if c.Capture == "" {
		c.Capture = CaptureHook
	}
	if _, err := ParseCaptureMode(string(c.Capture)); err != nil {
		errs = append(errs, err)
	}
	if c.CaptureInterval <= 0 {
		errs = append(errs, errors.New("--capture-interval: must be positive"))
	}
	if c.NixDBDir == "" {
		c.NixDBDir = storewatch.DefaultDir
	}
	if c.SpoolInterval <= 0 {
		errs = append(errs, errors.New("--spool-interval: must be positive"))
	}
	if c.GCPollInterval <= 0 {
		errs = append(errs, errors.New("--gc-poll-interval: must be positive"))
	}
	if c.GCInterval < 0 || (c.GCInterval > 0 && (c.GCGrace <= 0 || c.GCKeepSince < 0)) {
		errs = append(errs, errors.New("--gc-interval: must not be negative, and a schedule needs a positive --gc-grace and a --gc-keep-since that is not negative"))
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if len(errs) == 0 {
		return parsedConfig{Config: *c, cache: cache, excludes: excludes}, nil
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = e.Error()
	}
	return parsedConfig{}, errors.New(strings.Join(msgs, "; ")) // one line, every problem
}
