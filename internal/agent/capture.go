package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/metrics"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/storewatch"
	"github.com/nixspool/nixspool/protocol"
)

// CaptureMode says which paths reach the queue besides those the hook and
// agentctl push hand over.
type CaptureMode string

// Capture modes.
const (
	// CaptureHook: only what the hook and pushes hand over.
	CaptureHook CaptureMode = "hook"
	// CaptureLocal: also every path built or added on this machine
	// (storewatch.Path.Local): evaluation sources, nix-store --add,
	// import-from-derivation results, builds the hook missed.
	CaptureLocal CaptureMode = "local"
	// CaptureAll: also substituted and copied-in paths.
	CaptureAll CaptureMode = "all"
)

// ParseCaptureMode parses --capture's value.
func ParseCaptureMode(s string) (CaptureMode, error) {
	switch m := CaptureMode(s); m {
	case CaptureHook, CaptureLocal, CaptureAll:
		return m, nil
	}
	return "", fmt.Errorf("--capture %q: want hook, local or all", s)
}

// wider reports whether m takes in paths that o does not.
func (m CaptureMode) wider(o CaptureMode) bool {
	rank := map[CaptureMode]int{CaptureHook: 0, CaptureLocal: 1, CaptureAll: 2}
	return rank[m] > rank[o]
}

// captureMark is the name of the watcher's cursor in the queue's database.
const captureMark = "capture"

// cursorRecord is the watcher's durable cursor: the last row of Nix's
// database dealt with, and the mode it was read in.
type cursorRecord struct {
	Cursor int64       `json:"cursor"`
	Mode   CaptureMode `json:"mode"`
}

// capturer is the store watcher (agentd --capture local|all). Every
// interval it reads the rows Nix's database added since its cursor (one
// query when there are none; see storewatch), keeps those the mode takes
// in, and queues them as the hook's paths are queued (checked valid with
// the Nix daemon, rooted against garbage collection, one durable commit),
// with source "capture". The cursor is committed in the same transaction
// as the jobs: after a crash the watcher resumes from the last batch that
// is queued, never past one that is not, and a restart queues nothing
// again.
//
// Left out in every mode: derivations (.drv files are instructions, not
// what clients substitute), paths signed by a --skip-signed-by key (their
// cache serves them), and paths the cache is known to hold already (the
// presence cache), so that a first start, a reset database or a wider
// mode, which read the store from its beginning, queue only what the
// cache lacks. The filters of uploads (--exclude, --max-nar-size) apply
// to captured jobs as to any.
type capturer struct {
	admit    *admit
	presence presence
	marks    marks
	metrics  *metrics.Metrics // nil when off
	log      *slog.Logger
	mode     CaptureMode
	db       *storewatch.DB
	signers  map[string]bool
	interval time.Duration
	batch    int
	existing bool // read the whole store when there is no cursor yet

	mu       sync.Mutex
	cursor   int64
	loaded   bool
	captured uint64
	lastAt   time.Time
	lastErr  string
}

// presence is what the watcher asks the uploader: whether the cache is
// known to hold a path, in its current generation.
type presence interface {
	ConfirmGeneration(ctx context.Context, now time.Time) error
	KnownPresent(path string) bool
}

// marks keep the watcher's cursor in the queue's database.
type marks interface {
	GetMark(name string) ([]byte, error)
	SetMark(name string, value []byte) error
}

// captureDeps are what the watcher works with.
type captureDeps struct {
	admit    *admit
	presence presence
	marks    marks
	metrics  *metrics.Metrics
	log      *slog.Logger
	signers  map[string]bool // --skip-signed-by
}

// newCapturer opens Nix's database for mode. An error leaves capture off.
func newCapturer(d captureDeps, mode CaptureMode, dir string, interval time.Duration) (*capturer, error) {
	db, err := storewatch.Open(dir)
	if err != nil {
		return nil, err
	}
	c := &capturer{admit: d.admit, presence: d.presence, marks: d.marks, metrics: d.metrics, log: d.log,
		mode: mode, db: db, signers: d.signers, interval: interval, batch: 1000, existing: true}
	return c, nil
}

// run watches until ctx is done.
func (c *capturer) run(ctx context.Context) {
	defer c.db.Close()
	t := time.NewTicker(c.interval)
	defer t.Stop()
	for {
		n, err := c.cycle(ctx)
		c.mu.Lock()
		c.lastAt = time.Now()
		c.captured += uint64(n)
		if err != nil && ctx.Err() == nil {
			if c.lastErr != err.Error() {
				c.log.Error("store watcher", "err", err)
			}
			c.lastErr = err.Error()
		} else {
			c.lastErr = ""
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// cycle queues what became valid since the cursor and returns how many
// paths it handed to the queue.
func (c *capturer) cycle(ctx context.Context) (int, error) {
	cur, err := c.loadCursor(ctx)
	if err != nil {
		return 0, err
	}
	queued := 0
	for {
		b, err := c.db.Read(ctx, cur, c.batch)
		if err != nil {
			return queued, err
		}
		if b.Reset {
			c.log.Warn("Nix database numbering restarted below the watcher's cursor (a new database); reading it from the start, skipping what is queued or in the cache",
				"cursor", cur, "db", c.db.File())
		}
		if b.Next == cur && len(b.Paths) == 0 && !b.Reset {
			return queued, nil // idle
		}
		// A path is left out as present only on an answer confirmed in
		// the cache's current generation: the cursor moves past it for
		// good (a bucket emptied a moment ago must not lose it).
		trustPresence := c.presence.ConfirmGeneration(ctx, time.Now()) == nil
		paths := c.keep(b.Paths, trustPresence)
		if err := c.commit(ctx, paths, b.Next); err != nil {
			return queued, err
		}
		queued += len(paths)
		cur = b.Next
		if !b.More {
			return queued, nil
		}
	}
}

// keep returns the paths of rows the mode takes in.
// Paths known to be in the cache are left out if trustPresence.
func (c *capturer) keep(rows []storewatch.Path, trustPresence bool) []string {
	var out []string
	for _, p := range rows {
		switch {
		case strings.HasSuffix(p.Path, ".drv"):
		case c.mode == CaptureLocal && !p.Local():
		case p.SignedBy(c.signers):
		case trustPresence && c.presence.KnownPresent(p.Path):
		default:
			out = append(out, p.Path)
		}
	}
	return out
}

// commit queues paths (those still valid) and moves the cursor to next, in
// one commit.
func (c *capturer) commit(ctx context.Context, paths []string, next int64) error {
	rec, err := json.Marshal(cursorRecord{Cursor: next, Mode: c.mode})
	if err != nil {
		return err
	}
	mark := &queue.Mark{Name: captureMark, Value: rec}
	start := time.Now()
	res, n, err := c.admit.captured(ctx, paths, mark)
	if err != nil {
		return err
	}
	if n > 0 {
		fresh := 0
		for _, r := range res {
			if r.New {
				fresh++
			}
		}
		c.metrics.Enqueued(time.Since(start))
		c.metrics.Queued(queue.SourceCapture.String(), n)
		c.log.Info("captured paths queued", "paths", n, "new_jobs", fresh, "cursor", next, "duration", time.Since(start))
	}
	c.mu.Lock()
	c.cursor = next
	c.mu.Unlock()
	return nil
}

// loadCursor returns the cursor, read from the queue's database the first
// time. With none (capture never ran) or one read in a narrower mode, the
// store is read from its beginning.
func (c *capturer) loadCursor(ctx context.Context) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.loaded {
		return c.cursor, nil
	}
	raw, err := c.marks.GetMark(captureMark)
	if err != nil {
		return 0, fmt.Errorf("store watcher cursor: %w", err)
	}
	var rec cursorRecord
	if raw != nil {
		if err := json.Unmarshal(raw, &rec); err != nil {
			return 0, fmt.Errorf("store watcher cursor %q: %w", raw, err)
		}
	}
	switch {
	case raw == nil && !c.existing:
		if rec.Cursor, err = c.db.Last(ctx); err != nil {
			return 0, err
		}
		// Kept at once: paths registered while agentd is down, before
		// any cycle moved the cursor, are found at the next start.
		rec.Mode = c.mode
		v, _ := json.Marshal(rec)
		if err := c.marks.SetMark(captureMark, v); err != nil {
			return 0, fmt.Errorf("store watcher cursor: %w", err)
		}
		c.log.Info("store watcher starts at the store's top (paths already there are not queued)", "mode", c.mode, "cursor", rec.Cursor)
	case raw == nil:
		c.log.Info("store watcher starts; reading the whole store once", "mode", c.mode)
	case c.mode.wider(rec.Mode):
		c.log.Info("store watcher mode widened; reading the whole store once", "mode", c.mode, "was", rec.Mode)
		rec.Cursor = 0
	}
	c.cursor, c.loaded = rec.Cursor, true
	return c.cursor, nil
}

// status is the watcher's state for agentctl status.
func (c *capturer) status() *protocol.Capture {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &protocol.Capture{Mode: string(c.mode), Cursor: c.cursor, Captured: c.captured, Error: c.lastErr}
	if !c.lastAt.IsZero() {
		s.LastCycleAt = c.lastAt.Unix()
	}
	return s
}

// captureStatus is the watcher's state, nil when capture is off; a
// watcher that could not start reports why.
func (a *Agent) captureStatus() *protocol.Capture {
	if a.capture != nil {
		return a.capture.status()
	}
	if a.captureErr != nil {
		return &protocol.Capture{Mode: string(a.cfg.Capture), Error: a.captureErr.Error()}
	}
	return nil
}

// captureDeps are the parts of the agent the watcher works with.
func (a *Agent) captureDeps() captureDeps {
	return captureDeps{admit: a.intake, presence: a.uploader, marks: a.queue, metrics: a.metrics, log: a.log, signers: a.filter.signers}
}

// startCapture opens the store watcher for --capture local|all. A
// database it cannot read (an unknown schema after a Nix upgrade, no
// permission) leaves capture off with the reason in the log and in
// status; the hook's paths are uploaded as ever.
func (a *Agent) startCapture() {
	if a.cfg.Capture == CaptureHook || a.cfg.Capture == "" {
		return
	}
	c, err := newCapturer(a.captureDeps(), a.cfg.Capture, a.cfg.NixDBDir, a.cfg.CaptureInterval)
	if err != nil {
		hint := ""
		if errors.Is(err, storewatch.ErrSchema) {
			hint = "; capture stays off until an agentd that reads this schema is installed"
		}
		a.captureErr = fmt.Errorf("--capture %s: %w%s", a.cfg.Capture, err, hint)
		a.log.Error("store watcher off", "err", a.captureErr)
		return
	}
	c.existing = a.cfg.CaptureExisting
	a.capture = c
}
