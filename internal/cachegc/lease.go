package cachegc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// ErrLeaseHeld is wrapped by the error of a collector that finds another
// one at work on the bucket.
var ErrLeaseHeld = errors.New("another garbage collector holds the bucket's lease")

// ErrLeaseLost is wrapped when a collector finds that its lease expired
// or was taken over: it stops deleting at once.
var ErrLeaseLost = errors.New("the collector's lease was lost")

// LeaseHeldError names the collector at work.
type LeaseHeldError struct {
	Holder string
	Host   string
	Cycle  string
	Until  time.Time // by the store's clock
}

func (e *LeaseHeldError) Error() string {
	return fmt.Sprintf("%v: %s on %s (cycle %s) until %s at the latest; run gc again later",
		ErrLeaseHeld, e.Holder, e.Host, e.Cycle, e.Until.UTC().Format(time.RFC3339))
}

func (e *LeaseHeldError) Unwrap() error { return ErrLeaseHeld }

// leaseRecord is the lease object's content. Seq changes with every write,
// so every renewal has new bytes and a new ETag even on stores whose ETag
// is the content's MD5: a collector that read an expired lease cannot take
// over a lease renewed meanwhile.
type leaseRecord struct {
	Holder string `json:"holder"` // agent id and process nonce
	Agent  string `json:"agent"`
	Host   string `json:"host"`
	Cycle  string `json:"cycle,omitempty"`
	// TTL: the lease expires TTL after its LastModified (store's clock).
	TTL      time.Duration `json:"ttl_ns"`
	Seq      int64         `json:"seq"`
	Released bool          `json:"released,omitempty"`
}

// lease is a held lease.
type lease struct {
	b     bucket.Bucket
	clock Clock
	rec   leaseRecord
	etag  string
	// validUntil is when, by the local clock, another collector may
	// first take over: the last write began at sent, and the store
	// stamped it no earlier.
	validUntil time.Time
	// conditional is false on stores that ignore conditional writes.
	conditional bool
}

// acquireLease takes the bucket's lease for rec.Holder. A lease held by
// someone else is taken over only once it has expired by the store's
// clock, or was released, or was held by an earlier process of the same
// agent (which is dead: one agent's state directory is locked by one
// process). Where the store honours conditional writes the take-over is
// atomic; elsewhere it is best effort: write, wait, read back.
func acquireLease(ctx context.Context, b bucket.Bucket, clock Clock, rec leaseRecord, conditional bool) (*lease, error) {
	l := &lease{b: b, clock: clock, rec: rec, conditional: conditional}
	for attempt := 0; attempt < 3; attempt++ {
		var cur leaseRecord
		info, err := getJSON(ctx, b, LeaseKey, &cur)
		switch {
		case bucket.IsNotExist(err):
			if err := l.write(ctx, bucket.PutOptions{IfNoneMatch: true}); err != nil {
				if bucket.IsPrecondition(err) {
					continue // someone was quicker; look again
				}
				return nil, err
			}
		case err != nil:
			return nil, fmt.Errorf("read lease: %w", err)
		default:
			until := info.LastModified.Add(cur.TTL)
			mine := cur.Agent == rec.Agent && cur.Host == rec.Host
			// Expired only if so however far off the estimate of the
			// store's clock is.
			storeNow, bound := bucket.NowWithin(b)
			if !cur.Released && !mine && !storeNow.After(until.Add(bound)) {
				return nil, &LeaseHeldError{Holder: cur.Agent, Host: cur.Host, Cycle: cur.Cycle, Until: until}
			}
			l.rec.Seq = cur.Seq + 1
			if err := l.write(ctx, bucket.PutOptions{IfMatch: info.ETag}); err != nil {
				if bucket.IsPrecondition(err) {
					continue
				}
				return nil, err
			}
		}
		if !conditional {
			if err := l.confirm(ctx); err != nil {
				return nil, err
			}
		}
		return l, nil
	}
	return nil, fmt.Errorf("%w: it changed hands while being taken; run gc again later", ErrLeaseHeld)
}

// write writes the lease record with opts' condition and notes its ETag
// and how long it is valid.
func (l *lease) write(ctx context.Context, opts bucket.PutOptions) error {
	if !l.conditional {
		opts.IfMatch, opts.IfNoneMatch = "", false
	}
	sent := l.clock.Now()
	info, err := putJSON(ctx, l.b, LeaseKey, l.rec, opts)
	if err != nil {
		return err
	}
	l.etag = info.ETag
	l.validUntil = sent.Add(l.rec.TTL)
	return nil
}

// confirm is the fallback for stores without conditional writes: after a
// pause, the lease must still name this holder. Two collectors that start
// within the pause can both pass; that is why it is best effort.
func (l *lease) confirm(ctx context.Context) error {
	if err := l.clock.Sleep(ctx, 2*time.Second); err != nil {
		return err
	}
	var cur leaseRecord
	if _, err := getJSON(ctx, l.b, LeaseKey, &cur); err != nil {
		return fmt.Errorf("read lease back: %w", err)
	}
	if cur.Holder != l.rec.Holder {
		return &LeaseHeldError{Holder: cur.Agent, Host: cur.Host, Cycle: cur.Cycle}
	}
	return nil
}

// renew extends the lease. It fails with ErrLeaseLost if another
// collector has taken it.
func (l *lease) renew(ctx context.Context) error {
	l.rec.Seq++
	if !l.conditional {
		var cur leaseRecord
		if _, err := getJSON(ctx, l.b, LeaseKey, &cur); err != nil || cur.Holder != l.rec.Holder {
			return fmt.Errorf("%w (now held by %s)", ErrLeaseLost, cur.Agent)
		}
	}
	if err := l.write(ctx, bucket.PutOptions{IfMatch: l.etag}); err != nil {
		if bucket.IsPrecondition(err) || bucket.IsNotExist(err) {
			return fmt.Errorf("%w: another collector took it over", ErrLeaseLost)
		}
		return fmt.Errorf("renew lease: %w", err)
	}
	return nil
}

// remaining is how long the lease is certainly still held.
func (l *lease) remaining() time.Duration { return l.validUntil.Sub(l.clock.Now()) }

// release gives the lease up, so the next collector need not wait for it
// to expire.
func (l *lease) release(ctx context.Context) error {
	l.rec.Released = true
	l.rec.Seq++
	return l.write(ctx, bucket.PutOptions{IfMatch: l.etag})
}
