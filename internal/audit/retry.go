package audit

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// retrying asks a store again, with backoff, when it answers that it is
// overloaded or unreachable for a moment (throttling, 5xx, a reset
// connection), so that an audit reports the cache, not the weather.
type retrying struct {
	bucket.Bucket
}

const attempts = 6

func retry(ctx context.Context, fn func() error) error {
	delay := 200 * time.Millisecond
	var err error
	for i := 0; i < attempts; i++ {
		if err = fn(); err == nil || !errors.Is(err, bucket.ErrUnavailable) {
			return err
		}
		wait := delay
		if ra, ok := bucket.RetryAfter(err); ok && ra > wait {
			wait = ra
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, 5*time.Second)
	}
	return err
}

func (r *retrying) Stat(ctx context.Context, key string) (info bucket.Info, err error) {
	err = retry(ctx, func() error { info, err = r.Bucket.Stat(ctx, key); return err })
	return info, err
}

func (r *retrying) Get(ctx context.Context, key string, max int64) (data []byte, info bucket.Info, err error) {
	err = retry(ctx, func() error { data, info, err = r.Bucket.Get(ctx, key, max); return err })
	return data, info, err
}

func (r *retrying) Open(ctx context.Context, key string, offset, length int64) (rc io.ReadCloser, info bucket.Info, err error) {
	err = retry(ctx, func() error { rc, info, err = r.Bucket.Open(ctx, key, offset, length); return err })
	return rc, info, err
}

// List restarts a listing that failed part way after the last key seen.
func (r *retrying) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	var fnErr error
	return retry(ctx, func() error {
		err := r.Bucket.List(ctx, opts, func(o bucket.Object) error {
			if err := fn(o); err != nil {
				fnErr = err
				return err
			}
			opts.StartAfter = o.Key
			return nil
		})
		if fnErr != nil {
			return fnErr
		}
		return err
	})
}
