package cachegc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// ErrCollecting is wrapped by Check's refusals: an object a narinfo would
// rely on is about to be (or was) deleted by a collection cycle. It is
// transient: the upload is retried after the sweep.
var ErrCollecting = errors.New("garbage collection in progress")

// CollectingError names the object and the cycle.
type CollectingError struct {
	Key   string
	Cycle string
	Gone  bool // deleted already; the retry uploads it again
}

func (e *CollectingError) Error() string {
	if e.Gone {
		return fmt.Sprintf("%s was deleted by garbage collection (cycle %s); it is uploaded again on retry", e.Key, e.Cycle)
	}
	return fmt.Sprintf("%s is about to be deleted by garbage collection (cycle %s); retrying after the sweep", e.Key, e.Cycle)
}

func (e *CollectingError) Unwrap() error { return ErrCollecting }

// WatcherOptions configure a Watcher.
type WatcherOptions struct {
	Bucket bucket.Bucket
	// Poll is how often announcements are listed (default 20s).
	Poll time.Duration
	// Stale: Check lists announcements itself when the last listing began
	// longer ago than this (default 2×Poll). Every collector's grace minus
	// its margin must exceed it; the Watcher registers it in the bucket so
	// collectors can check.
	Stale time.Duration
	// Forget drops store paths from the uploader's presence cache.
	Forget func(paths []string)
	// ID and Host name this agent in its watcher record.
	ID, Host, Version string
	Clock             Clock
	Logger            *slog.Logger
	// OnRefuse, if set, is called for each refusal of Check.
	OnRefuse func()
}

// Watcher is the uploader's side of the protocol: it lists announcements
// every Poll, drops announced paths from the presence cache, and answers
// the uploader's questions (it implements uploader.Guard).
type Watcher struct {
	opt WatcherOptions
	sf  singleflight.Group

	mu        sync.Mutex
	anns      map[string]*watched   // by cycle
	byKey     map[string][]*watched // narinfo and NAR keys → the cycles dooming them
	polled    bool
	lastStart time.Time       // local time the last successful listing began
	minGap    time.Duration   // smallest Grace-Margin announced (0: none seen)
	verified  map[string]bool // key+"\x00"+cycle: present after its cycle ended
	failing   bool
	lastErr   error // of the last listing of announcements (nil: it worked)
	// blind: the bucket cannot be listed here (see WatcherRecord.Blind);
	// blindRegistered: the registration saying so is in the bucket.
	blind, blindRegistered bool
}

// watched is one announcement as this agent sees it.
type watched struct {
	cycle string
	paths map[string]string // narinfo key → store path
	nars  []string
	// dangerAt is the earliest local time at which the sweep may have
	// begun; voidAt the earliest at which the collector can certainly no
	// longer delete by this announcement.
	dangerAt, voidAt time.Time
	margin           time.Duration // the announcement's M
	retired          bool
	endForgotten     bool
}

// NewWatcher returns a Watcher; call Run to keep it polling.
func NewWatcher(opt WatcherOptions) *Watcher {
	if opt.Poll <= 0 {
		opt.Poll = 20 * time.Second
	}
	if opt.Stale <= 0 {
		opt.Stale = 2 * opt.Poll
	}
	if opt.Clock == nil {
		opt.Clock = RealClock{}
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	return &Watcher{opt: opt, anns: map[string]*watched{}, byKey: map[string][]*watched{}, verified: map[string]bool{}}
}

// SetForget sets the function that drops paths from the presence cache
// (before Run).
func (w *Watcher) SetForget(f func(paths []string)) { w.opt.Forget = f }

// Stale is the longest Check relies on a listing.
func (w *Watcher) Stale() time.Duration { return w.opt.Stale }

// stale is the freshness Check demands: the configured bound, tightened
// if an announcement showed a shorter grace than collectors should use.
func (w *Watcher) stale() time.Duration {
	s := w.opt.Stale
	if w.minGap > 0 && w.minGap-clockSlack < s {
		s = max(w.minGap-clockSlack, 50*time.Millisecond)
	}
	return s
}

// Poll lists the announcements once (or joins a listing in flight).
func (w *Watcher) Poll(ctx context.Context) error {
	err := w.pollShared(ctx)
	if ctx.Err() == nil {
		w.mu.Lock()
		w.lastErr = err
		w.mu.Unlock()
	}
	return err
}

// LastError returns why the last listing of announcements failed, or nil.
// While it fails, narinfo writes wait: an operator sees it in the log and
// in `agentctl doctor`. An announcement that cannot be decoded (written by
// a newer collector, or damaged) keeps failing until a collector of this
// version or newer retires it, or an operator deletes the object.
func (w *Watcher) LastError() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.blind {
		return nil
	}
	return w.lastErr
}

func (w *Watcher) pollShared(ctx context.Context) error {
	_, err, _ := w.sf.Do("poll", func() (any, error) { return nil, w.poll(ctx) })
	return err
}

func (w *Watcher) poll(ctx context.Context) error {
	start := w.opt.Clock.Now()
	objs := map[string]bucket.Object{}
	done := map[string]bool{}
	err := w.opt.Bucket.List(ctx, bucket.ListOptions{Prefix: PollPrefix, Recursive: true}, func(o bucket.Object) error {
		if cycle, isAnn := cachefmt.Keys.GCCycle(o.Key); cycle != "" {
			if isAnn {
				objs[cycle] = o
			} else {
				done[cycle] = true
			}
		}
		return nil
	})
	if err != nil {
		if unlistable(err) {
			w.mu.Lock()
			first := !w.blind
			w.blind = true
			w.mu.Unlock()
			if first {
				w.opt.Logger.Warn("this cache cannot be listed with this URL (an HTTP binary cache, or an S3 bucket named inside endpoint=); this agent cannot see garbage-collection announcements, so it registers as blind: collectors refuse to run while it does, and it writes narinfos only while no collector holds the lease", "err", err)
			}
		}
		return fmt.Errorf("list gc announcements: %w", err)
	}
	end := w.opt.Clock.Now()
	// The store's clock, to within bound (measured: docs/gc.md,
	// "Assumptions").
	storeNow, bound := bucket.NowWithin(w.opt.Bucket)

	w.mu.Lock()
	prevPolled, prevStart := w.polled, w.lastStart
	var toRead []bucket.Object
	for cycle, o := range objs {
		if w.anns[cycle] == nil {
			toRead = append(toRead, o)
		}
	}
	w.mu.Unlock()

	read := map[string]*Announcement{}
	for _, o := range toRead {
		data, _, err := w.opt.Bucket.Get(ctx, o.Key, maxAnnouncement)
		if bucket.IsNotExist(err) {
			continue // deleted since the listing (older than Retention)
		}
		if err != nil {
			return fmt.Errorf("read gc announcement: %w", err)
		}
		a, err := decodeAnnouncement(data)
		if err != nil {
			return fmt.Errorf("%s: %w", o.Key, err)
		}
		read[a.Cycle] = a
	}

	w.mu.Lock()
	var forget []string
	for cycle, a := range read {
		if w.anns[cycle] != nil {
			continue
		}
		o := objs[cycle]
		gap := a.Grace - a.Margin
		// Upper bound of the announcement's age: by the store's clock
		// (LastModified against the Date header), and, when the last
		// listing did not show it, the time since that listing began.
		ageMax := max(storeNow.Sub(o.LastModified)+bound, 0)
		danger := end.Add(gap - ageMax)
		if prevPolled && prevStart.Add(gap).Before(danger) {
			danger = prevStart.Add(gap)
		}
		// Lower bound of its age: it existed when the listing ended.
		ageMin := max(storeNow.Sub(o.LastModified)-bound, 0)
		void := end.Add(a.Grace + a.Window + a.Margin - ageMin)
		wa := &watched{cycle: cycle, paths: map[string]string{}, nars: a.NARs, dangerAt: danger, voidAt: void, margin: a.Margin,
			endForgotten: done[cycle] || !end.Before(void)}
		for _, p := range a.Paths {
			if storepath.Check(storepath.DefaultStoreDir, p) == nil {
				k := cachefmt.Keys.NarinfoOf(p)
				wa.paths[k] = p
				w.byKey[k] = append(w.byKey[k], wa)
			}
		}
		for _, k := range a.NARs {
			w.byKey[k] = append(w.byKey[k], wa)
		}
		w.anns[cycle] = wa
		if w.minGap == 0 || gap < w.minGap {
			w.minGap = gap
		}
		forget = append(forget, a.Paths...)
		w.opt.Logger.Info("gc announcement seen", "cycle", cycle, "paths", len(a.Paths), "nars", len(a.NARs),
			"danger_in", danger.Sub(end).Round(time.Millisecond), "retired", done[cycle])
	}
	for cycle, wa := range w.anns {
		if _, ok := objs[cycle]; !ok {
			w.drop(wa)
			continue
		}
		wa.retired = done[cycle]
		if (wa.retired || !end.Before(wa.voidAt)) && !wa.endForgotten {
			// Presence learned while the cycle ran may be stale now.
			wa.endForgotten = true
			for _, p := range wa.paths {
				forget = append(forget, p)
			}
		}
	}
	w.mu.Unlock()

	if len(forget) > 0 && w.opt.Forget != nil {
		w.opt.Forget(forget)
	}
	w.mu.Lock()
	w.polled, w.lastStart = true, start
	w.mu.Unlock()
	return nil
}

// drop forgets an announcement that left the bucket.
func (w *Watcher) drop(wa *watched) {
	delete(w.anns, wa.cycle)
	unindex := func(k string) {
		list := w.byKey[k][:0]
		for _, x := range w.byKey[k] {
			if x != wa {
				list = append(list, x)
			}
		}
		if len(list) == 0 {
			delete(w.byKey, k)
		} else {
			w.byKey[k] = list
		}
		delete(w.verified, k+"\x00"+wa.cycle)
	}
	for k := range wa.paths {
		unindex(k)
	}
	for _, k := range wa.nars {
		unindex(k)
	}
}

// fresh makes sure the last listing began within the staleness bound,
// listing now if not.
func (w *Watcher) fresh(ctx context.Context) error {
	w.mu.Lock()
	ok := w.polled && w.opt.Clock.Now().Sub(w.lastStart) < w.stale()
	w.mu.Unlock()
	if ok {
		return nil
	}
	if err := w.Poll(ctx); err != nil {
		return fmt.Errorf("cannot tell whether a garbage collector is deleting what this upload relies on: %w", err)
	}
	return nil
}

// Check implements uploader.Guard. A narinfo may be written now unless an
// object it relies on is doomed by a cycle whose danger zone has begun and
// that is not over. An object doomed by a cycle that is over is confirmed
// to exist (once per object and cycle): presence learned while the cycle
// ran may predate its deletion.
//
// It returns how long the write may take: the write must have been sent
// and, if it has not completed, given up within that time (assumption A2
// in docs/gc.md: what is given up lands within half a margin). That is
// half a margin past the danger zone of every cycle dooming a relied key,
// and for cycles not seen yet, half the smallest margin past the earliest
// instant their sweep can begin (the last listing, plus the shortest
// grace a collector may announce for this agent).
func (w *Watcher) Check(ctx context.Context, relied []string) (time.Duration, error) {
	if w.isBlind() {
		// No collector may start while this agent is registered blind,
		// and none holds the lease now; even one that ignored the
		// registration would sweep only after a grace longer than this.
		return w.blindWithin(), w.checkBlind(ctx)
	}
	if err := w.fresh(ctx); err != nil {
		if w.isBlind() {
			return w.blindWithin(), w.checkBlind(ctx)
		}
		return 0, err
	}
	type pending struct {
		key string
		wa  *watched
	}
	var verify []pending
	now := w.opt.Clock.Now()
	w.mu.Lock()
	// A cycle announced after the last listing began sweeps no earlier
	// than that plus its grace, which collectors keep above
	// stale + clockSlack + MinMargin for this agent.
	within := w.lastStart.Add(w.stale() + clockSlack + MinMargin/2).Sub(now)
	for _, k := range relied {
		for _, wa := range w.byKey[k] {
			active := !wa.retired && now.Before(wa.voidAt)
			switch {
			case active && !now.Before(wa.dangerAt):
				w.mu.Unlock()
				if w.opt.OnRefuse != nil {
					w.opt.OnRefuse()
				}
				return 0, &CollectingError{Key: k, Cycle: wa.cycle}
			case active:
				within = min(within, wa.dangerAt.Add(wa.margin/2).Sub(now))
			case !w.verified[k+"\x00"+wa.cycle]:
				verify = append(verify, pending{k, wa})
			}
		}
	}
	w.mu.Unlock()
	for _, v := range verify {
		_, err := w.opt.Bucket.Stat(ctx, v.key)
		switch {
		case err == nil:
			w.mu.Lock()
			w.verified[v.key+"\x00"+v.wa.cycle] = true
			w.mu.Unlock()
		case bucket.IsNotExist(err):
			if p := v.wa.paths[v.key]; p != "" && w.opt.Forget != nil {
				w.opt.Forget([]string{p})
			}
			if w.opt.OnRefuse != nil {
				w.opt.OnRefuse()
			}
			return 0, &CollectingError{Key: v.key, Cycle: v.wa.cycle, Gone: true}
		default:
			return 0, fmt.Errorf("check %s after garbage collection: %w", v.key, err)
		}
	}
	// The confirmations took time of their own.
	within -= w.opt.Clock.Now().Sub(now)
	if within <= 0 {
		return 0, errTooLate
	}
	return within, nil
}

// blindWithin is how long a blind agent's write may take: less than the
// shortest grace a collector may announce while this agent's staleness
// bound is registered, minus half the smallest margin.
func (w *Watcher) blindWithin() time.Duration {
	return w.opt.Stale + clockSlack + MinMargin/2
}

// errTooLate: the check took so long that the write could no longer land
// in time. Transient: the next attempt checks again.
var errTooLate = errors.New("the garbage-collection check took longer than the margin allows; retrying")

// Doomed implements uploader.Guard: key is doomed by a cycle that is not
// over.
func (w *Watcher) Doomed(key string) bool {
	if w.isBlind() {
		return false // nothing can be announced while this agent runs
	}
	now := w.opt.Clock.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, wa := range w.byKey[key] {
		if !wa.retired && now.Before(wa.voidAt) {
			return true
		}
	}
	return false
}

// Active returns the cycles whose announcements are not over.
func (w *Watcher) Active() []string {
	now := w.opt.Clock.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for c, wa := range w.anns {
		if !wa.retired && now.Before(wa.voidAt) {
			out = append(out, c)
		}
	}
	return out
}

// register writes this agent's watcher record.
func (w *Watcher) register(ctx context.Context) error {
	if w.opt.ID == "" {
		return nil
	}
	blind := w.isBlind()
	rec := WatcherRecord{ID: w.opt.ID, Host: w.opt.Host, Stale: w.opt.Stale, Poll: w.opt.Poll, Version: w.opt.Version, Blind: blind}
	if _, err := putJSON(ctx, w.opt.Bucket, cachefmt.Keys.Watcher(w.opt.ID), rec, bucket.PutOptions{}); err != nil {
		return fmt.Errorf("register as gc watcher: %w", err)
	}
	if blind {
		w.mu.Lock()
		w.blindRegistered = true
		w.mu.Unlock()
	}
	return nil
}

func (w *Watcher) isBlind() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.blind
}

// unlistable tells an error that says the bucket cannot be listed with
// this URL from a passing failure (which leaves the agent waiting).
func unlistable(err error) bool {
	return err != nil && !errors.Is(err, bucket.ErrUnavailable) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) &&
		(bucket.IsNotExist(err) || bucket.IsPermanent(err))
}

// checkBlind is Check for an agent that cannot see announcements: once it
// is registered as blind (so no collector starts a cycle), a narinfo may be
// written while no collector holds the lease (every deletion happens under
// a held lease).
func (w *Watcher) checkBlind(ctx context.Context) error {
	w.mu.Lock()
	registered := w.blindRegistered
	w.mu.Unlock()
	if !registered {
		if err := w.register(ctx); err != nil {
			return fmt.Errorf("cannot tell whether a garbage collector is deleting what this upload relies on: %w", err)
		}
	}
	var rec leaseRecord
	info, err := getJSON(ctx, w.opt.Bucket, LeaseKey, &rec)
	switch {
	case bucket.IsNotExist(err):
		return nil
	case err != nil:
		return fmt.Errorf("cannot tell whether a garbage collector is at work: %w", err)
	case rec.Released:
		return nil
	}
	if storeNow, bound := bucket.NowWithin(w.opt.Bucket); storeNow.Sub(info.LastModified) > rec.TTL+bound {
		return nil
	}
	if w.opt.OnRefuse != nil {
		w.opt.OnRefuse()
	}
	return fmt.Errorf("a garbage collector (%s on %s) holds the lease of this cache; this agent cannot see what it deletes, so it waits for it to finish", rec.Agent, rec.Host)
}

// Run registers the agent and lists announcements every Poll until ctx is
// done. The registration is renewed daily.
func (w *Watcher) Run(ctx context.Context) {
	var registered time.Time
	for {
		if registered.IsZero() || w.opt.Clock.Now().Sub(registered) > 24*time.Hour {
			if err := w.register(ctx); err == nil {
				registered = w.opt.Clock.Now()
			} else if ctx.Err() == nil {
				w.opt.Logger.Warn("gc watcher", "err", err)
			}
		}
		err := w.Poll(ctx)
		if w.isBlind() {
			w.mu.Lock()
			registered := w.blindRegistered
			w.mu.Unlock()
			if !registered {
				if rerr := w.register(ctx); rerr != nil && ctx.Err() == nil {
					w.opt.Logger.Warn("gc watcher: register as blind", "err", rerr)
				}
			}
			err = nil // blind is a state, not a failure: see checkBlind
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && !w.failing:
			w.failing = true
			w.opt.Logger.Warn("gc watcher: cannot list announcements; narinfo writes wait until it can", "err", err)
		case err == nil && w.failing:
			w.failing = false
			w.opt.Logger.Info("gc watcher: announcements readable again")
		}
		if w.opt.Clock.Sleep(ctx, w.opt.Poll) != nil {
			return
		}
	}
}
