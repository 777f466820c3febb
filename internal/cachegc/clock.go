package cachegc

import (
	"context"
	"io"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// Clock is the local clock waits and deadlines are measured with. The
// protocol never compares it with the store's clock: it only measures
// intervals with it (time.Time's monotonic reading). Tests substitute a
// fake.
type Clock interface {
	Now() time.Time
	// Sleep waits d or until ctx is done (then it returns ctx's error).
	Sleep(ctx context.Context, d time.Duration) error
}

// RealClock is the machine's clock.
type RealClock struct{}

// Now implements Clock.
func (RealClock) Now() time.Time { return time.Now() }

// Sleep implements Clock.
func (RealClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// counting wraps a bucket and counts the requests made through it. List
// requests are counted as S3 pages (1,000 keys each).
type counting struct {
	bucket.Bucket
	lists, gets, heads, puts, deletes atomic.Int64
}

func (c *counting) Stat(ctx context.Context, key string) (bucket.Info, error) {
	c.heads.Add(1)
	return c.Bucket.Stat(ctx, key)
}

func (c *counting) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	c.gets.Add(1)
	return c.Bucket.Get(ctx, key, max)
}

func (c *counting) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	c.puts.Add(1)
	return c.Bucket.Put(ctx, key, r, size, opts)
}

func (c *counting) Delete(ctx context.Context, key string) error {
	c.deletes.Add(1)
	return c.Bucket.Delete(ctx, key)
}

func (c *counting) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	n := 0
	err := c.Bucket.List(ctx, opts, func(o bucket.Object) error {
		n++
		return fn(o)
	})
	c.lists.Add(int64(n/1000 + 1))
	return err
}

// Now is the store's clock, as the wrapped bucket knows it.
func (c *counting) Now() time.Time { return bucket.Now(c.Bucket) }

// NowWithin is the store's clock and the bound on its error, as the
// wrapped bucket knows them.
func (c *counting) NowWithin() (time.Time, time.Duration) { return bucket.NowWithin(c.Bucket) }

// deleteKeys deletes keys (at most 1,000) in one request where the bucket
// can, else one by one. Deletes go to the bucket directly, not through a
// request window: they must go out within the margin of the check before
// them (docs/gc.md, A2), and a window's wait has no bound.
func (c *counting) deleteKeys(ctx context.Context, keys []string) error {
	b := bucket.Direct(c.Bucket)
	if bd, ok := b.(bucket.BatchDeleter); ok {
		c.deletes.Add(1)
		return bd.DeleteMany(ctx, keys)
	}
	for _, k := range keys {
		c.deletes.Add(1)
		if err := b.Delete(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

func (c *counting) requests() Requests {
	return Requests{List: c.lists.Load(), Get: c.gets.Load(), Head: c.heads.Load(), Put: c.puts.Load(), Delete: c.deletes.Load()}
}
