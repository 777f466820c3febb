package gc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nixspool/nixspool/bucket"
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
}

// CheckStore probes b as a collector does before a cycle: conditional
// writes (probe objects under nixspool/gc/, deleted afterwards) and the
// bound on the estimate of the store's clock. It changes nothing else.
func CheckStore(ctx context.Context, b bucket.Bucket) (StoreCheck, error) {
	var sc StoreCheck
	var err error
	if sc.IfNoneMatch, err = bucket.ProbeConditional(ctx, b, PollPrefix+"probe-"); err != nil {
		return sc, err
	}
	if sc.IfNoneMatch {
		switch err := bucket.ProbeIfMatch(ctx, b, PollPrefix+"probe-"); {
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
	return sc, nil
}

// Problem says why a collector with the given grace would refuse this
// store, or what it does only best effort; "" if neither.
func (sc StoreCheck) Problem(grace time.Duration) string {
	switch limit := maxClockBound(TimingFor(grace)); {
	case sc.IfNoneMatch && !sc.IfMatch:
		return fmt.Sprintf("garbage collection is refused: the store honours If-None-Match but not If-Match (%s)", sc.IfMatchDetail)
	case sc.ClockBound > limit:
		return (&ClockBoundError{Bound: sc.ClockBound, Max: limit}).Error()
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
