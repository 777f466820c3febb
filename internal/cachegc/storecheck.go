package cachegc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// StoreCheck is what the collector's safety argument needs of the store
// (docs/gc.md, "Assumptions"), as measured now.
type StoreCheck struct {
	// IfNoneMatch: the store refuses a create-only write over an
	// existing key. Without it the lease is best effort.
	IfNoneMatch bool `json:"if_none_match"`
	// IfMatch: the store refuses a write naming a wrong ETag (probed only
	// where IfNoneMatch holds: elsewhere nothing sends If-Match).
	IfMatch bool `json:"if_match"`
	// IfMatchDetail says what went wrong when IfMatch is false.
	IfMatchDetail string `json:"if_match_detail,omitempty"`
	// ClockBound bounds the error of the estimate of the store's clock.
	ClockBound time.Duration `json:"clock_bound_ns"`
	// ListLag is how long a probe object took to appear in a listing
	// after its write, and to leave it after its delete (0: at once).
	ListLag time.Duration `json:"list_lag_ns"`
}

// CheckStore probes b as a collector does before a cycle: conditional
// writes (probe objects under nixspool/gc/, deleted afterwards) and the
// bound on the estimate of the store's clock. It changes nothing else.
func CheckStore(ctx context.Context, b bucket.Bucket) (StoreCheck, error) {
	var sc StoreCheck
	var err error
	if sc.IfNoneMatch, err = bucket.ProbeConditional(ctx, b, ProbePrefix); err != nil {
		return sc, err
	}
	if sc.IfNoneMatch {
		switch err := bucket.ProbeIfMatch(ctx, b, ProbePrefix); {
		case err == nil:
			sc.IfMatch = true
		case errors.Is(err, bucket.ErrIfMatchIgnored):
			sc.IfMatchDetail = err.Error()
		default:
			return sc, err
		}
	}
	if sc.ClockBound, err = measureClock(ctx, b); err != nil {
		return sc, err
	}
	if sc.ListLag, err = MeasureListLag(ctx, b); err != nil {
		return sc, err
	}
	return sc, nil
}

// maxListLagProbe bounds how long MeasureListLag waits for a listing to
// catch up.
const maxListLagProbe = 10 * time.Second

// MeasureListLag writes a probe object under nixspool/gc/, and measures
// how long a listing takes to show it, and then, after it is deleted, to
// stop showing it. A lag L delays what a watcher sees of announcements by
// L, and hides from the sweep's listing what was written in the last L
// before it; both fit in the margin while L < M/4 (docs/gc.md,
// "Assumptions"), and a larger lag is refused (ListLagError).
func MeasureListLag(ctx context.Context, b bucket.Bucket) (time.Duration, error) {
	key := ProbePrefix + "list-" + newCycleID(time.Now())
	listed := func() (bool, error) {
		found := false
		err := b.List(ctx, bucket.ListOptions{Prefix: key, Recursive: true}, func(o bucket.Object) error {
			found = found || o.Key == key
			return nil
		})
		return found, err
	}
	waitFor := func(want bool) (time.Duration, error) {
		start := time.Now()
		for {
			got, err := listed()
			if err != nil {
				return 0, fmt.Errorf("list probe: %w", err)
			}
			if got == want {
				return time.Since(start), nil
			}
			if time.Since(start) > maxListLagProbe {
				return maxListLagProbe, nil
			}
			t := time.NewTimer(20 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return 0, ctx.Err()
			case <-t.C:
			}
		}
	}
	if _, err := b.Put(ctx, key, bytes.NewReader(nil), 0, bucket.PutOptions{}); err != nil {
		return 0, fmt.Errorf("write list probe: %w", err)
	}
	appear, err := waitFor(true)
	if derr := b.Delete(context.WithoutCancel(ctx), key); derr != nil && err == nil {
		err = fmt.Errorf("delete list probe: %w", derr)
	}
	if err != nil {
		return 0, err
	}
	vanish, err := waitFor(false)
	if err != nil {
		return 0, err
	}
	// The first listing of each wait is a round trip, not lag.
	return max(appear, vanish), nil
}

// ListLagError: listings lag writes by too much for the sweep.
type ListLagError struct{ Lag, Max time.Duration }

func (e *ListLagError) Error() string {
	return fmt.Sprintf("%v: listings showed a write or a delete only after %s, not less than the %s a quarter of the margin allows", ErrStoreUnfit, e.Lag.Round(time.Millisecond), e.Max)
}

func (e *ListLagError) Unwrap() error { return ErrStoreUnfit }

// Problem says why a collector with the given grace would refuse this
// store, or what it does only best effort; "" if neither.
func (sc StoreCheck) Problem(grace time.Duration) string {
	switch limit := maxClockBound(TimingFor(grace)); {
	case sc.IfNoneMatch && !sc.IfMatch:
		return fmt.Sprintf("garbage collection is refused: the store honours If-None-Match but not If-Match (%s)", sc.IfMatchDetail)
	case sc.ClockBound > limit:
		return (&ClockBoundError{Bound: sc.ClockBound, Max: limit}).Error()
	case sc.ListLag >= maxListLag(TimingFor(grace)):
		return (&ListLagError{Lag: sc.ListLag, Max: maxListLag(TimingFor(grace))}).Error()
	case !sc.IfNoneMatch:
		return "the store ignores conditional writes: only one collector at a time is best effort"
	}
	return ""
}

// measureClock makes one request without a body (a HEAD of the lease),
// whose answer is a sample of the store's clock, and returns the bound on
// the error of the estimate.
func measureClock(ctx context.Context, b bucket.Bucket) (time.Duration, error) {
	if _, err := b.Stat(ctx, LeaseKey); err != nil && !bucket.IsNotExist(err) {
		return 0, fmt.Errorf("read lease: %w", err)
	}
	_, bound := bucket.NowWithin(b)
	return bound, nil
}

// maxListLag is the listing lag a cycle with timing tm tolerates.
func maxListLag(tm Timing) time.Duration { return tm.Margin / 4 }
