package cachegc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
)

// Options configure one collection cycle.
type Options struct {
	// KeepSince: every narinfo written within this time before the mark
	// (by its LastModified, on the store's clock) is a root.
	KeepSince time.Duration
	// Grace is the time between the announcement and the sweep.
	Grace time.Duration
	// DryRun marks only: it reports what a cycle would delete now and
	// changes nothing in the bucket.
	DryRun bool
	// Agent and Host identify the collector in the lease.
	Agent, Host string
	// LeaseTTL is how long the lease lasts without renewal (default 2m).
	LeaseTTL time.Duration
	// UploadAge: multipart uploads started longer ago are abandoned and
	// aborted (default 24h).
	UploadAge time.Duration
	// Concurrency bounds reads in flight (default 32).
	Concurrency int
	// Cache remembers what was read per object version; nil reads every
	// narinfo on every run.
	Cache *RefCache
	// Clock measures waits and deadlines (default the real clock).
	Clock Clock
	// Logger receives one line per event.
	Logger *slog.Logger
	// Progress, if set, is called when the cycle moves on and about once
	// a second during long steps.
	Progress func(Progress)
	// MaxListed bounds the keys and paths listed in the report (default
	// 100,000).
	MaxListed int

	// beforeDelete, if set (tests), runs before each delete request.
	beforeDelete func(stage string, keys []string)
	// afterAnnounce, if set (tests), runs once the announcement is written.
	afterAnnounce func()
}

// Progress is one report of where a cycle is.
type Progress struct {
	Stage string `json:"stage"`
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
}

// Stages of a cycle, in order.
const (
	StageLease    = "lease"
	StageList     = "list"
	StageRead     = "read"
	StageAnnounce = "announce"
	StageGrace    = "grace"
	StageSweep    = "sweep"
	StageDelete   = "delete"
	StageDone     = "done"
)

// Counts is a number of objects by kind, and their bytes.
type Counts struct {
	Narinfos int   `json:"narinfos"`
	NARs     int   `json:"nars"`
	Others   int   `json:"others"` // listings, build logs, realisations
	Uploads  int   `json:"uploads"`
	Bytes    int64 `json:"bytes"`
}

// Objects is the number of objects counted.
func (c Counts) Objects() int { return c.Narinfos + c.NARs + c.Others }

// Requests counts requests to the store by kind.
type Requests struct {
	List   int64 `json:"list"`
	Get    int64 `json:"get"`
	Head   int64 `json:"head"`
	Put    int64 `json:"put"`
	Delete int64 `json:"delete"`
}

// Report is the outcome of a cycle.
type Report struct {
	Cycle     string        `json:"cycle,omitempty"`
	DryRun    bool          `json:"dry_run"`
	KeepSince time.Duration `json:"keep_since_ns"`
	Grace     time.Duration `json:"grace_ns"`
	// MarkTime is T_m, by the store's clock.
	MarkTime time.Time `json:"mark_time"`
	// ClockBound is the measured bound on the error of the collector's
	// estimate of the store's clock (bucket.NowWithin).
	ClockBound time.Duration `json:"clock_bound_ns"`
	// Objects and Bytes: the cache when it was marked (its own objects,
	// not the collector's).
	Objects int   `json:"objects"`
	Bytes   int64 `json:"bytes"`
	// Roots are the narinfos written within KeepSince; Pins the pins;
	// Live the narinfos reachable from them.
	Roots int `json:"roots"`
	Pins  int `json:"pins"`
	Live  int `json:"live"`
	// Doomed is what the mark found unreachable (in a dry run: what a
	// cycle would delete now).
	Doomed Counts `json:"doomed"`
	// Deleted is what the sweep deleted.
	Deleted Counts `json:"deleted"`
	// Revived counts doomed narinfos the sweep kept because a fresh root
	// (a narinfo written since the mark, or a pin) needs them.
	Revived int `json:"revived"`
	// KeptObjects and KeptBytes: the cache after the cycle.
	KeptObjects int   `json:"kept_objects"`
	KeptBytes   int64 `json:"kept_bytes"`
	// Complete is true when the sweep ran to its end.
	Complete bool          `json:"complete"`
	Requests Requests      `json:"requests"`
	Duration time.Duration `json:"duration_ns"`
	Warnings []string      `json:"warnings,omitempty"`
	// Paths are the store paths whose narinfos were deleted (dry run:
	// would be), and Keys every key deleted (would be), sorted; both are
	// cut at Options.MaxListed (Truncated says so).
	Paths     []string `json:"paths,omitempty"`
	Keys      []string `json:"keys,omitempty"`
	Truncated bool     `json:"truncated,omitempty"`
}

// Summary is a one-line account of the report.
func (r *Report) Summary() string {
	q := r.Requests
	reqs := fmt.Sprintf("requests: %d lists, %d GETs, %d HEADs, %d PUTs, %d DELETEs", q.List, q.Get, q.Head, q.Put, q.Delete)
	if r.DryRun {
		return fmt.Sprintf("gc dry run: would delete %d narinfos, %d NARs, %d other objects and abort %d uploads (%s) of %d objects (%s); %d roots, %d pins, %d live narinfos; %s; %s",
			r.Doomed.Narinfos, r.Doomed.NARs, r.Doomed.Others, r.Doomed.Uploads, HumanBytes(r.Doomed.Bytes), r.Objects, HumanBytes(r.Bytes),
			r.Roots, r.Pins, r.Live, reqs, r.Duration.Round(time.Millisecond))
	}
	state := "complete"
	if !r.Complete {
		state = "INCOMPLETE"
	}
	return fmt.Sprintf("gc %s: deleted %d narinfos, %d NARs, %d other objects, aborted %d uploads (%s); kept %d objects (%s); %d revived; %s; %s",
		state, r.Deleted.Narinfos, r.Deleted.NARs, r.Deleted.Others, r.Deleted.Uploads, HumanBytes(r.Deleted.Bytes),
		r.KeptObjects, HumanBytes(r.KeptBytes), r.Revived, reqs, r.Duration.Round(time.Millisecond))
}

// HumanBytes renders n in binary units.
func HumanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// Errors of a cycle.
var (
	// ErrWindowOver: the sweep ran past its window and stopped deleting
	// (agents no longer hold back for the announcement).
	ErrWindowOver = errors.New("the sweep's window ended before it finished; the next cycle continues")
	// ErrGraceTooShort wraps GraceTooShortError.
	ErrGraceTooShort = errors.New("grace too short")
	// ErrStoreUnfit is wrapped when the store lacks what the protocol's
	// safety argument assumes (docs/gc.md, "Assumptions"): the collector
	// refuses to start.
	ErrStoreUnfit = errors.New("the store does not meet the garbage collector's assumptions")
)

// ClockBoundError: the store's clock cannot be estimated well enough.
type ClockBoundError struct {
	Bound, Max time.Duration
}

func (e *ClockBoundError) Error() string {
	if e.Bound >= bucket.UnknownClockBound {
		return fmt.Sprintf("%v: no answer of the store gave its clock (a Date header on a request without a body)", ErrStoreUnfit)
	}
	return fmt.Sprintf("%v: the store's clock is known only to within %s (half the round trip of its quickest recent answer, plus a second), more than the %s this cycle's margin allows; the store answers too slowly for the timing of this grace (try a longer --grace, or a closer endpoint)",
		ErrStoreUnfit, e.Bound.Round(time.Millisecond), e.Max)
}

func (e *ClockBoundError) Unwrap() error { return ErrStoreUnfit }

// GraceTooShortError: an agent may write for longer than the grace
// without reading announcements.
type GraceTooShortError struct {
	ID, Host string
	Stale    time.Duration
	Grace    time.Duration
	MinGrace time.Duration
}

func (e *GraceTooShortError) Error() string {
	return fmt.Sprintf("--grace %s is too short for the agent %s on %s, which may write for up to %s without reading gc announcements (its --gc-poll-interval); use --grace %s or more",
		e.Grace, e.ID, e.Host, e.Stale, e.MinGrace)
}

func (e *GraceTooShortError) Unwrap() error { return ErrGraceTooShort }

// MinGraceFor returns the shortest grace whose danger zone still begins
// after an agent that reads announcements at least every stale has seen
// the announcement.
func MinGraceFor(stale time.Duration) time.Duration {
	need := stale + clockSlack
	ok := func(g time.Duration) bool { return g-TimingFor(g).Margin >= need }
	for _, g := range []time.Duration{need + 2*time.Second, (need*4 + 2) / 3, need + 15*time.Minute} {
		if ok(g) {
			return g.Round(time.Second) + time.Second
		}
	}
	return need + 15*time.Minute
}

func (o *Options) defaults() {
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 2 * time.Minute
	}
	if o.UploadAge <= 0 {
		o.UploadAge = 24 * time.Hour
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Clock == nil {
		o.Clock = RealClock{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxListed <= 0 {
		o.MaxListed = 100000
	}
	if o.Agent == "" {
		o.Agent = "collector"
	}
}

// sweepPerObject is the time a sweep is given per object to delete, on
// top of three times the mark's duration (objects go 1,000 a request).
const sweepPerObject = 5 * time.Millisecond

// plan is what the mark dooms.
type plan struct {
	narinfos map[string]bool // hash parts
	nars     map[string]bool // keys
	others   map[string]bool // keys: listings, logs, realisations
	uploads  []bucket.Upload
}

// collector is one cycle in progress.
type collector struct {
	b        *counting
	opt      Options
	tm       Timing
	log      *slog.Logger
	lease    *lease
	deadline time.Time // local: no delete is sent after it
	deleted  map[string]bool
	delErr   bool // a delete failed: it may still land later
	batch    int  // keys per delete request: halved when one is too slow
	rep      *Report
}

// Run runs one collection cycle on b (see the package documentation):
// lease, mark, announce, grace, sweep. It returns the report also when it
// fails (with what was done so far).
func Run(ctx context.Context, b bucket.Bucket, opt Options) (*Report, error) {
	opt.defaults()
	rep := &Report{DryRun: opt.DryRun, KeepSince: opt.KeepSince, Grace: opt.Grace}
	if opt.Grace <= 0 || opt.KeepSince < 0 {
		return rep, errors.New("gc: --grace must be positive and --keep-since not negative")
	}
	if err := bucket.CheckListable(b); err != nil {
		return rep, fmt.Errorf("gc refused: %w, and garbage collection must see every object; collect the directory or bucket behind it (file://… or s3://…) instead", err)
	}
	c := &collector{b: &counting{Bucket: b}, opt: opt, tm: TimingFor(opt.Grace), log: opt.Logger, deleted: map[string]bool{}, rep: rep}
	start := opt.Clock.Now()
	err := c.run(ctx)
	rep.Requests = c.b.requests()
	rep.Duration = opt.Clock.Now().Sub(start)
	return rep, err
}

func (c *collector) stage(stage string, done, total int64) {
	if c.opt.Progress != nil {
		c.opt.Progress(Progress{Stage: stage, Done: done, Total: total})
	}
}

func (c *collector) warn(msg string, args ...any) {
	c.rep.Warnings = append(c.rep.Warnings, fmt.Sprintf(msg, args...))
	c.log.Warn(fmt.Sprintf(msg, args...))
}

func (c *collector) run(ctx context.Context) error {
	opt := c.opt
	if err := c.checkClock(ctx); err != nil {
		if !opt.DryRun {
			return fmt.Errorf("gc: %w", err)
		}
		c.warn("%v", err)
	}
	var markTime time.Time
	if !opt.DryRun {
		c.stage(StageLease, 0, 0)
		cond, err := bucket.ProbeConditional(ctx, c.b, ProbePrefix)
		if err != nil {
			return fmt.Errorf("gc: %w", err)
		}
		if !cond {
			c.warn("the store ignores conditional writes: only one collector at a time is best effort (write, wait, read back)")
		} else if err := bucket.ProbeIfMatch(ctx, c.b, ProbePrefix); err != nil {
			if errors.Is(err, bucket.ErrIfMatchIgnored) {
				// Taking over and renewing the lease would look atomic
				// and not be, and agents' revivals could overwrite.
				return fmt.Errorf("gc: %w: it honours create-only writes (If-None-Match) but not compare-and-swap (%w); the lease and revivals rely on it", ErrStoreUnfit, err)
			}
			return fmt.Errorf("gc: %w", err)
		}
		// The sweep's listing must show what was written before the
		// danger zone began (docs/gc.md, "Assumptions").
		lag, err := MeasureListLag(ctx, c.b)
		if err != nil {
			return fmt.Errorf("gc: %w", err)
		}
		if max := maxListLag(c.tm); lag >= max {
			return fmt.Errorf("gc: %w", &ListLagError{Lag: lag, Max: max})
		}
		rec := leaseRecord{Holder: opt.Agent + "/" + newCycleID(time.Now()), Agent: opt.Agent, Host: opt.Host, TTL: opt.LeaseTTL}
		if c.lease, err = acquireLease(ctx, c.b, opt.Clock, rec, cond); err != nil {
			return fmt.Errorf("gc: %w", err)
		}
		defer func() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if err := c.lease.release(rctx); err != nil {
				c.log.Warn("gc: release lease", "err", err)
			}
		}()
		// The mark begins now: T_m is the lease write's time on the
		// store's clock, cut to the second (earlier is safer: more
		// narinfos count as written since).
		info, err := c.b.Stat(ctx, LeaseKey)
		if err != nil {
			return fmt.Errorf("gc: read lease: %w", err)
		}
		if info.ETag != c.lease.etag && c.lease.conditional {
			return fmt.Errorf("gc: %w", ErrLeaseLost)
		}
		markTime = info.LastModified.Truncate(time.Second)
	} else {
		markTime = bucket.Now(c.b).Truncate(time.Second)
	}
	c.rep.MarkTime = markTime

	c.stage(StageList, 0, 0)
	markStart := opt.Clock.Now()
	snap, err := listAll(ctx, c.b)
	if err != nil {
		return fmt.Errorf("gc: list: %w", err)
	}
	c.rep.Objects, c.rep.Bytes = snap.objects, snap.bytes
	if err := load(ctx, c.b, snap, nil, opt.Cache, opt.Concurrency, func(d, t int) { c.stage(StageRead, int64(d), int64(t)) }); err != nil {
		return fmt.Errorf("gc: read: %w", err)
	}
	if err := c.checkWatchers(ctx, snap, markTime); err != nil {
		if !opt.DryRun {
			return fmt.Errorf("gc: %w", err)
		}
		c.warn("%v", err)
	}
	p := c.mark(ctx, snap, markTime)
	// The reference cache forgets objects that are gone.
	if err := opt.Cache.prune(snap.listed); err != nil {
		c.warn("prune the reference cache: %v", err)
	}
	c.log.Info("gc mark done", "mark_time", markTime, "objects", snap.objects, "roots", c.rep.Roots, "pins", c.rep.Pins,
		"live", c.rep.Live, "doomed_narinfos", len(p.narinfos), "doomed_nars", len(p.nars), "doomed_others", len(p.others))
	if opt.DryRun {
		var keys, paths []string
		for h := range p.narinfos {
			keys = append(keys, snap.narinfos[h].Key)
			paths = append(paths, snap.info[h].Path)
		}
		for k := range p.nars {
			keys = append(keys, k)
		}
		for k := range p.others {
			keys = append(keys, k)
		}
		c.list(keys, paths)
		c.rep.KeptObjects = snap.objects - c.rep.Doomed.Objects()
		c.rep.KeptBytes = snap.bytes - c.rep.Doomed.Bytes
		c.rep.Complete = true
		c.stage(StageDone, 0, 0)
		return nil
	}
	if n := len(p.narinfos) + len(p.nars) + len(p.others); n > 0 {
		// The window must fit the sweep: another listing, reads of what
		// changed, and the deletes. A longer window costs nothing unless
		// the collector dies (agents then hold back until it ends).
		c.tm.Window = max(c.tm.Window, 3*opt.Clock.Now().Sub(markStart)+time.Duration(n)*sweepPerObject)
		if err := c.announceAndSweep(ctx, snap, p, markTime); err != nil {
			return err
		}
	}
	if err := c.abortUploads(ctx, p.uploads); err != nil {
		return err
	}
	c.cleanup(ctx, snap, markTime)
	c.rep.KeptObjects = snap.objects - c.rep.Deleted.Objects()
	c.rep.KeptBytes = snap.bytes - c.rep.Deleted.Bytes
	var keys, paths []string
	for k := range c.deleted {
		keys = append(keys, k)
		if h := cachefmt.Keys.NarinfoHash(k); h != "" && snap.info[h] != nil {
			paths = append(paths, snap.info[h].Path)
		}
	}
	c.list(keys, paths)
	c.rep.Complete = true
	c.stage(StageDone, 0, 0)
	return nil
}

// list puts the sorted keys and paths in the report, cut at MaxListed.
func (c *collector) list(keys, paths []string) {
	sort.Strings(keys)
	sort.Strings(paths)
	if len(keys) > c.opt.MaxListed {
		keys, c.rep.Truncated = keys[:c.opt.MaxListed], true
	}
	if len(paths) > c.opt.MaxListed {
		paths, c.rep.Truncated = paths[:c.opt.MaxListed], true
	}
	c.rep.Keys, c.rep.Paths = keys, paths
}

// checkClock measures how well the store's clock is known (a HEAD of the
// lease, an answer without a body, gives a sample) and refuses a bound the
// margin does not cover.
func (c *collector) checkClock(ctx context.Context) error {
	bound, err := measureClock(ctx, c.b)
	if err != nil {
		return err
	}
	c.rep.ClockBound = bound
	c.log.Debug("gc store clock", "bound", bound)
	if limit := maxClockBound(c.tm); bound > limit {
		return &ClockBoundError{Bound: bound, Max: limit}
	}
	return nil
}

// checkWatchers refuses a grace too short for an agent that registered
// recently: its danger zone could begin before that agent has seen the
// announcement. An agent that cannot list the bucket (blind) cannot see
// announcements at all: no cycle starts while one is registered.
func (c *collector) checkWatchers(ctx context.Context, s *snapshot, markTime time.Time) error {
	for k, o := range s.watchers {
		if markTime.Sub(o.LastModified) > watcherFresh {
			continue
		}
		var rec WatcherRecord
		if _, err := getJSON(ctx, c.b, k, &rec); err != nil {
			if bucket.IsNotExist(err) {
				continue
			}
			return fmt.Errorf("read watcher record %s: %w", k, err)
		}
		if rec.Blind {
			return &BlindWatcherError{ID: rec.ID, Host: rec.Host}
		}
		if c.tm.Grace-c.tm.Margin < rec.Stale+clockSlack {
			return &GraceTooShortError{ID: rec.ID, Host: rec.Host, Stale: rec.Stale, Grace: c.tm.Grace, MinGrace: MinGraceFor(rec.Stale)}
		}
	}
	return nil
}

// mark finds the roots (narinfos written within KeepSince, recent
// realisations, pins), their closure, and dooms the rest: unreachable
// narinfos, the NARs only they point at, NARs and listings nothing points
// at that are older than the grace, listings of doomed paths, build logs
// older than KeepSince of derivations no live path came from,
// realisations of doomed outputs, abandoned multipart uploads.
func (c *collector) mark(ctx context.Context, s *snapshot, markTime time.Time) *plan {
	cutoff := markTime.Add(-c.opt.KeepSince)
	old := markTime.Add(-c.opt.Grace)
	var roots []string
	for h, o := range s.narinfos {
		if !o.LastModified.Before(cutoff) || s.info[h] == nil || s.info[h].Bad {
			roots = append(roots, h)
			if !o.LastModified.Before(cutoff) {
				c.rep.Roots++
			}
		}
	}
	for k, o := range s.realisations {
		if info := s.info[k]; info != nil && !info.Bad && !o.LastModified.Before(cutoff) {
			roots = append(roots, info.Refs...)
		}
	}
	for k := range s.pins {
		if info := s.info[k]; info != nil && !info.Bad {
			roots = append(roots, info.Refs...)
			c.rep.Pins++
			if _, ok := s.narinfos[info.Refs[0]]; !ok {
				c.warn("pin %s names %s, which is not in the cache", pinName(k), info.Path)
			}
		}
	}
	live := s.closure(roots)
	c.rep.Live = len(live)
	p := &plan{narinfos: map[string]bool{}, nars: map[string]bool{}, others: map[string]bool{}}
	liveURL, doomedURL, liveDrv := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for h, o := range s.narinfos {
		info := s.info[h]
		if live[h] {
			if info != nil {
				liveURL[info.URL] = true
				liveDrv[info.Deriver] = true
			}
			continue
		}
		p.narinfos[h] = true
		c.rep.Doomed.Narinfos++
		c.rep.Doomed.Bytes += o.Size
		if info != nil {
			doomedURL[info.URL] = true
		}
	}
	for k, o := range s.nars {
		if liveURL[k] || !(doomedURL[k] || o.LastModified.Before(old)) {
			continue
		}
		p.nars[k] = true
		c.rep.Doomed.NARs++
		c.rep.Doomed.Bytes += o.Size
	}
	other := func(o bucket.Object) {
		if !p.others[o.Key] {
			p.others[o.Key] = true
			c.rep.Doomed.Others++
			c.rep.Doomed.Bytes += o.Size
		}
	}
	for h := range p.narinfos {
		if o, ok := s.listings[h]; ok {
			other(o)
		}
	}
	// Build logs follow the retention of the paths they built: a log
	// goes once it is older than KeepSince and no live path was built by
	// its derivation (logs of failed builds included).
	for k, o := range s.logs {
		if drv, _ := cachefmt.Keys.LogDrv(k); !liveDrv[drv] && o.LastModified.Before(cutoff) {
			other(o)
		}
	}
	for h, o := range s.listings {
		if _, ok := s.narinfos[h]; !ok && o.LastModified.Before(old) {
			other(o)
		}
	}
	for k, o := range s.realisations {
		if info := s.info[k]; info != nil && !info.Bad && o.LastModified.Before(cutoff) && p.narinfos[info.Refs[0]] {
			other(o)
		}
	}
	if mp, ok := c.b.Bucket.(bucket.Multipart); ok {
		ups, err := mp.ListUploads(ctx, "")
		if err != nil {
			c.warn("list multipart uploads: %v", err)
		}
		for _, u := range ups {
			if u.Initiated.Before(markTime.Add(-c.opt.UploadAge)) {
				p.uploads = append(p.uploads, u)
			}
		}
		c.rep.Doomed.Uploads = len(p.uploads)
	}
	return p
}

// announceAndSweep writes the announcement, waits the grace, and sweeps.
// Whatever happens after the announcement, the cycle is retired with a
// done marker unless the process dies (then agents let the announcement
// lapse after its window).
func (c *collector) announceAndSweep(ctx context.Context, snap *snapshot, p *plan, markTime time.Time) (err error) {
	c.stage(StageAnnounce, 0, 0)
	cycle := newCycleID(markTime)
	c.rep.Cycle = cycle
	c.lease.rec.Cycle = cycle
	if err := c.lease.renew(ctx); err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	a := &Announcement{Version: announceVersion, Cycle: cycle, Holder: c.lease.rec.Holder, MarkTime: markTime,
		Grace: c.tm.Grace, Margin: c.tm.Margin, Window: c.tm.Window}
	for h := range p.narinfos {
		a.Paths = append(a.Paths, snap.info[h].Path)
	}
	for k := range p.nars {
		a.NARs = append(a.NARs, k)
	}
	for k := range p.others {
		a.Others = append(a.Others, k)
	}
	sort.Strings(a.Paths)
	sort.Strings(a.NARs)
	sort.Strings(a.Others)
	data, err := encodeAnnouncement(a)
	if err != nil {
		return err
	}
	sent := c.opt.Clock.Now()
	if _, err := c.b.Put(ctx, announceKey(cycle), strings.NewReader(string(data)), int64(len(data)),
		bucket.PutOptions{ContentType: "application/zstd", IfNoneMatch: c.lease.conditional}); err != nil {
		// It may have landed all the same: retire it.
		c.retire(ctx, cycle, false, "announcement failed: "+err.Error())
		return fmt.Errorf("gc: announce: %w", err)
	}
	announced := c.opt.Clock.Now()
	// No delete may land after T_a+Grace+Window; T_a is after sent.
	c.deadline = sent.Add(c.tm.Grace + c.tm.Window - c.tm.Margin)
	c.log.Info("gc announced", "cycle", cycle, "narinfos", len(a.Paths), "nars", len(a.NARs), "others", len(a.Others),
		"bytes", c.rep.Doomed.Bytes, "grace", c.tm.Grace, "margin", c.tm.Margin, "window", c.tm.Window)
	if c.opt.afterAnnounce != nil {
		c.opt.afterAnnounce()
	}
	defer func() {
		reason := ""
		if err != nil {
			reason = err.Error()
		}
		if c.delErr {
			// A delete that failed may still land: wait until any
			// such one has, before agents may rely on its key again.
			c.opt.Clock.Sleep(context.WithoutCancel(ctx), c.tm.Margin)
		}
		c.retire(ctx, cycle, err == nil, reason)
	}()

	// The grace, by the local clock from the moment the announcement was
	// certainly written.
	until := announced.Add(c.tm.Grace)
	for {
		left := until.Sub(c.opt.Clock.Now())
		if left <= 0 {
			break
		}
		c.stage(StageGrace, int64((c.tm.Grace - left).Seconds()), int64(c.tm.Grace.Seconds()))
		if c.lease.remaining() < c.opt.LeaseTTL*2/3 {
			if err := c.lease.renew(ctx); err != nil {
				return fmt.Errorf("gc: %w", err)
			}
		}
		if err := c.opt.Clock.Sleep(ctx, min(left, time.Second)); err != nil {
			return fmt.Errorf("gc: interrupted during the grace period: %w", err)
		}
	}
	return c.sweep(ctx, snap, p, markTime)
}

// retire writes the cycle's done marker: from then on agents no longer
// hold back for it.
func (c *collector) retire(ctx context.Context, cycle string, complete bool, reason string) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	d := Done{Cycle: cycle, Complete: complete, Deleted: len(c.deleted), Reason: reason}
	if _, err := putJSON(rctx, c.b, doneKey(cycle), d, bucket.PutOptions{}); err != nil {
		c.log.Warn("gc: write done marker; agents wait for the announcement to lapse", "cycle", cycle, "err", err)
		return
	}
	c.log.Info("gc cycle retired", "cycle", cycle, "complete", complete, "deleted", len(c.deleted))
}

// sweep lists the bucket again and deletes what is still unreachable and
// unmodified since the mark, referrers first.
func (c *collector) sweep(ctx context.Context, prev *snapshot, p *plan, markTime time.Time) error {
	c.log.Info("gc sweep started", "cycle", c.rep.Cycle)
	c.stage(StageSweep, 0, 0)
	s, err := listAll(ctx, c.b)
	if err != nil {
		return fmt.Errorf("gc: sweep: list: %w", err)
	}
	if err := load(ctx, c.b, s, prev, c.opt.Cache, c.opt.Concurrency, func(d, t int) { c.stage(StageSweep, int64(d), int64(t)) }); err != nil {
		return fmt.Errorf("gc: sweep: read: %w", err)
	}
	// Fresh: not in the mark's listing as it is now, or modified since
	// the mark. A LastModified before the mark does not say that the
	// object was in the mark's listing: stores stamp it before the write
	// becomes visible (docs/gc.md, "Assumptions").
	fresh := func(marked map[string]bucket.Object, id string, o bucket.Object) bool {
		m, ok := marked[id]
		return !ok || m.ETag != o.ETag || !m.LastModified.Equal(o.LastModified) || !o.LastModified.Before(markTime)
	}
	// Fresh roots: every narinfo and realisation written since the mark,
	// every pin.
	var roots []string
	for h, o := range s.narinfos {
		if fresh(prev.narinfos, h, o) || s.info[h] == nil || s.info[h].Bad {
			roots = append(roots, h)
		}
	}
	for k, o := range s.realisations {
		if info := s.info[k]; info != nil && !info.Bad && fresh(prev.realisations, k, o) {
			roots = append(roots, info.Refs...)
		}
	}
	for k := range s.pins {
		if info := s.info[k]; info != nil && !info.Bad {
			roots = append(roots, info.Refs...)
		}
	}
	keep := s.closure(roots)
	del := map[string]bool{}
	for h := range p.narinfos {
		o, ok := s.narinfos[h]
		switch {
		case !ok:
		case keep[h] || fresh(prev.narinfos, h, o):
			c.rep.Revived++
		default:
			del[h] = true
		}
	}
	// Realisations of outputs that go, before the outputs.
	var reals []string
	for k := range p.others {
		o, ok := s.realisations[k]
		if !ok || fresh(prev.realisations, k, o) {
			continue
		}
		if info := s.info[k]; info != nil && !info.Bad {
			if _, there := s.narinfos[info.Refs[0]]; del[info.Refs[0]] || !there {
				reals = append(reals, k)
			}
		}
	}
	if err := c.deleteKeys(ctx, "realisations", reals, s); err != nil {
		return err
	}
	for i, layer := range layers(s, del) {
		keys := make([]string, len(layer))
		for j, h := range layer {
			keys[j] = s.narinfos[h].Key
		}
		if err := c.deleteKeys(ctx, fmt.Sprintf("narinfos layer %d", i+1), keys, s); err != nil {
			return err
		}
	}
	// NARs and the rest, now that no narinfo needs them.
	pointed, drvs := map[string]bool{}, map[string]bool{}
	for h := range s.narinfos {
		if !del[h] && s.info[h] != nil {
			pointed[s.info[h].URL] = true
			drvs[s.info[h].Deriver] = true
		}
	}
	var nars, rest []string
	for k := range p.nars {
		if o, ok := s.nars[k]; ok && !fresh(prev.nars, k, o) && !pointed[k] {
			nars = append(nars, k)
		}
	}
	for k := range p.others {
		if h := cachefmt.Keys.ListingHash(k); h != "" {
			if o, ok := s.listings[h]; ok && !fresh(prev.listings, h, o) {
				if _, there := s.narinfos[h]; !there || del[h] {
					rest = append(rest, k)
				}
			}
		} else if drv, ok := cachefmt.Keys.LogDrv(k); ok {
			if o, ok := s.logs[k]; ok && !fresh(prev.logs, k, o) && !drvs[drv] {
				rest = append(rest, k)
			}
		}
	}
	if err := c.deleteKeys(ctx, "nars", nars, s); err != nil {
		return err
	}
	return c.deleteKeys(ctx, "listings and logs", rest, s)
}

// deleteKeys deletes keys in requests of up to 1,000 keys, each only after
// checking that the lease is held and the sweep's window is open.
func (c *collector) deleteKeys(ctx context.Context, what string, keys []string, s *snapshot) error {
	sort.Strings(keys)
	if c.batch <= 0 {
		c.batch = maxDeleteBatch
	}
	for len(keys) > 0 {
		n := min(len(keys), c.batch)
		batch := keys[:n]
		if err := c.mayDelete(ctx); err != nil {
			return err
		}
		if c.opt.beforeDelete != nil {
			c.opt.beforeDelete(what, batch)
		}
		c.stage(StageDelete, int64(len(c.deleted)), 0)
		// Sent and, if not done, given up within half a margin of the
		// check: what is given up lands within the other half (A2).
		dctx, cancel := context.WithTimeout(ctx, c.tm.Margin/2)
		err := c.b.deleteKeys(dctx, batch)
		late := err != nil && ctx.Err() == nil && errors.Is(dctx.Err(), context.DeadlineExceeded)
		cancel()
		if err != nil {
			c.delErr = true
		}
		if late && c.batch > 1 {
			// The store is slower than a batch this size allows: halve it
			// and send the same keys again (deleting a key twice is
			// harmless), each request still checked and bounded.
			c.batch = max(c.batch/2, 1)
			c.log.Info("gc delete request too slow for the margin; smaller batches", "what", what, "batch", c.batch)
			continue
		}
		if err != nil {
			return fmt.Errorf("gc: delete %s: %w", what, err)
		}
		keys = keys[n:]
		for _, k := range batch {
			c.deleted[k] = true
			c.count(k, s)
		}
		c.log.Debug("gc deleted", "what", what, "keys", len(batch))
	}
	return nil
}

// maxDeleteBatch is the most keys one delete request names (S3's limit).
const maxDeleteBatch = 1000

func (c *collector) count(k string, s *snapshot) {
	d := &c.rep.Deleted
	switch cachefmt.Keys.Kind(k) {
	case cachefmt.KindNarinfo:
		d.Narinfos++
		d.Bytes += s.narinfos[cachefmt.Keys.NarinfoHash(k)].Size
	case cachefmt.KindNAR:
		d.NARs++
		d.Bytes += s.nars[k].Size
	case cachefmt.KindListing:
		d.Others++
		d.Bytes += s.listings[cachefmt.Keys.ListingHash(k)].Size
	case cachefmt.KindLog:
		d.Others++
		d.Bytes += s.logs[k].Size
	default:
		d.Others++
		d.Bytes += s.realisations[k].Size
	}
}

// mayDelete checks, before a delete request, that the sweep's window is
// open and the lease held (renewing it when it runs low).
func (c *collector) mayDelete(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !c.deadline.IsZero() && !c.opt.Clock.Now().Before(c.deadline) {
		return fmt.Errorf("gc: %w", ErrWindowOver)
	}
	if c.lease.remaining() < c.opt.LeaseTTL*2/3 {
		if err := c.lease.renew(ctx); err != nil {
			return fmt.Errorf("gc: %w", err)
		}
	}
	if c.lease.remaining() < c.tm.Margin {
		return fmt.Errorf("gc: %w", ErrLeaseLost)
	}
	return nil
}

// abortUploads aborts abandoned multipart uploads. Nothing relies on an
// upload in progress: an agent whose upload is gone starts it again.
func (c *collector) abortUploads(ctx context.Context, ups []bucket.Upload) error {
	mp, ok := c.b.Bucket.(bucket.Multipart)
	if !ok {
		return nil
	}
	for _, u := range ups {
		if err := c.mayDelete(ctx); err != nil {
			return err
		}
		c.b.deletes.Add(1)
		if err := mp.AbortMultipart(ctx, u.Key, u.UploadID); err != nil {
			c.warn("abort multipart upload of %s: %v", u.Key, err)
			continue
		}
		c.rep.Deleted.Uploads++
	}
	return nil
}

// cleanup deletes announcements and done markers older than Retention, and
// watcher records of agents silent for as long.
func (c *collector) cleanup(ctx context.Context, s *snapshot, markTime time.Time) {
	var old []string
	for k, o := range s.cycles {
		if markTime.Sub(o.LastModified) > Retention {
			old = append(old, k)
		}
	}
	for k, o := range s.watchers {
		if markTime.Sub(o.LastModified) > Retention {
			old = append(old, k)
		}
	}
	sort.Strings(old)
	for len(old) > 0 {
		n := min(len(old), 1000)
		if err := c.b.deleteKeys(ctx, old[:n]); err != nil {
			c.warn("delete old gc records: %v", err)
			return
		}
		old = old[n:]
	}
}

// BlindWatcherError refuses a cycle while an agent that cannot list the
// bucket (and so cannot see announcements) is registered.
type BlindWatcherError struct{ ID, Host string }

func (e *BlindWatcherError) Error() string {
	return fmt.Sprintf("the agent %s on %s cannot list this bucket (its cache URL names the bucket inside endpoint=), so it cannot see what a collector announces; garbage collection is refused while it runs. Give it the path-style URL (s3://BUCKET/PREFIX?endpoint=REGION-ENDPOINT)", e.ID, e.Host)
}
