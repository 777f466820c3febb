package cachegc

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
)

// Keys of the collector's objects (cachefmt.Layout has them all).
const (
	LeaseKey       = cachefmt.GCLeaseKey
	AnnouncePrefix = cachefmt.GCAnnouncePrefix
	DonePrefix     = cachefmt.GCDonePrefix
	PollPrefix     = cachefmt.GCPollPrefix
	WatcherPrefix  = cachefmt.WatcherPrefix
	PinPrefix      = cachefmt.PinPrefix
	ProbePrefix    = cachefmt.GCProbePrefix
)

// Retention is how long announcements and done markers of past cycles
// stay in the bucket. It exceeds the uploader's presence-cache lifetime
// (24 hours), so an agent that was down during a cycle still learns, when it
// starts, which of the paths it remembers as present were deleted.
const Retention = 8 * 24 * time.Hour

// watcherFresh is how recent a watcher record must be for the collector to
// count its agent as running: agents rewrite it every day.
const watcherFresh = 2 * 24 * time.Hour

// announceVersion is the format version of announcements.
const announceVersion = 1

// Announcement is what a cycle will delete, written at least one grace
// period before the sweep. Its own LastModified (T_a, by the store's
// clock) starts the clock agents use: from T_a+Grace-Margin (the danger
// zone) no narinfo relying on a doomed object may be written, until the
// cycle's done marker appears or T_a+Grace+Window+Margin has passed.
type Announcement struct {
	Version int    `json:"version"`
	Cycle   string `json:"cycle"`
	Holder  string `json:"holder"`
	// MarkTime (T_m) is when the mark began, by the store's clock: a
	// narinfo modified since is a root of the sweep.
	MarkTime time.Time     `json:"mark_time"`
	Grace    time.Duration `json:"grace_ns"`
	Margin   time.Duration `json:"margin_ns"`
	Window   time.Duration `json:"window_ns"`
	// Paths are the store paths whose narinfos are doomed.
	Paths []string `json:"paths"`
	// NARs are the doomed NAR keys.
	NARs []string `json:"nars"`
	// Others are doomed listings, build logs and realisations.
	Others []string `json:"others"`
}

// Done is a retired cycle's marker.
type Done struct {
	Cycle    string `json:"cycle"`
	Complete bool   `json:"complete"`
	Deleted  int    `json:"deleted"`
	Reason   string `json:"reason,omitempty"`
}

// WatcherRecord is an agent's registration as a watcher.
type WatcherRecord struct {
	ID   string `json:"id"`
	Host string `json:"host"`
	// Stale is the longest the agent writes narinfos without having
	// listed announcements: a cycle's grace minus its margin must exceed
	// it.
	Stale   time.Duration `json:"stale_ns"`
	Poll    time.Duration `json:"poll_ns"`
	Version string        `json:"version,omitempty"`
	// Blind: the agent cannot list the bucket (its cache URL names the
	// bucket inside the endpoint, as the DigitalOcean form of Nix's guide
	// does), so it cannot read announcements. No collector may start while
	// it runs; it writes narinfos only while no collector holds the lease.
	Blind bool `json:"blind,omitempty"`
}

// Timing is a cycle's timing, derived from its grace.
type Timing struct {
	Grace time.Duration
	// Margin covers the time between an agent's check and its narinfo
	// landing (and a collector's check and its delete landing), clock
	// rate differences over the grace, and the one-second resolution of
	// the Date header.
	Margin time.Duration
	// Window is how long after the grace the sweep may still delete: the
	// grace again, and at least 15 seconds; a cycle with much to delete
	// lengthens it (Run). A sweep that runs out of it stops; the next
	// cycle goes on.
	Window time.Duration
}

// TimingFor returns the timing of a cycle with the given grace.
func TimingFor(grace time.Duration) Timing {
	return Timing{Grace: grace, Margin: max(MinMargin, min(grace/4, 15*time.Minute)), Window: max(grace, 15*time.Second)}
}

// MinMargin is the smallest margin of any cycle.
const MinMargin = 2 * time.Second

// clockSlack is S in the rule every collector enforces and every agent
// relies on, G − M ≥ F + S (docs/gc.md, "Timing"): a constant both sides
// agree on. Comparisons of the store's clock with LastModified use the
// measured bound of the estimate instead (bucket.NowWithin).
const clockSlack = time.Second

// maxClockBound is the largest error of the estimate of the store's clock
// a collector accepts: the margin (a quick request's round trip is then
// about twice the margin, and the margin is meant to cover a request in
// flight), and never more than 30 seconds.
func maxClockBound(tm Timing) time.Duration { return min(tm.Margin, 30*time.Second) }

// newCycleID names a cycle: the store's time, sortable, and random bits.
func newCycleID(storeNow time.Time) string {
	var rnd [4]byte
	rand.Read(rnd[:])
	return storeNow.UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(rnd[:])
}

func announceKey(cycle string) string { return cachefmt.Keys.GCAnnouncement(cycle) }
func doneKey(cycle string) string     { return cachefmt.Keys.GCDone(cycle) }

// maxAnnouncement bounds an announcement read into memory.
const maxAnnouncement = 1 << 30

var zstdDecoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxAnnouncement))

func encodeAnnouncement(a *Announcement) ([]byte, error) {
	js, err := json.Marshal(a)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	w, err := zstd.NewWriter(&buf, zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	w.Write(js)
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func decodeAnnouncement(data []byte) (*Announcement, error) {
	js, err := zstdDecoder.DecodeAll(data, nil)
	if err != nil {
		return nil, fmt.Errorf("announcement: %w", err)
	}
	var a Announcement
	if err := json.Unmarshal(js, &a); err != nil {
		return nil, fmt.Errorf("announcement: %w", err)
	}
	if a.Version != announceVersion {
		return nil, fmt.Errorf("announcement: format version %d (this nixspool reads %d)", a.Version, announceVersion)
	}
	if a.Grace <= 0 || a.Margin <= 0 || a.Window < 0 || !cachefmt.ValidCycle(a.Cycle) {
		return nil, errors.New("announcement: bad timing or cycle")
	}
	return &a, nil
}

// putJSON writes v as JSON at key.
func putJSON(ctx context.Context, b bucket.Bucket, key string, v any, opts bucket.PutOptions) (bucket.Info, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return bucket.Info{}, err
	}
	opts.ContentType = "application/json"
	return b.Put(ctx, key, bytes.NewReader(data), int64(len(data)), opts)
}

// getJSON reads the JSON object at key into v.
func getJSON(ctx context.Context, b bucket.Bucket, key string, v any) (bucket.Info, error) {
	data, info, err := b.Get(ctx, key, 1<<20)
	if err != nil {
		return info, err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return info, fmt.Errorf("%s: %w", key, err)
	}
	return info, nil
}
