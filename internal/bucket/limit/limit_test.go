package limit

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/buckettest"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// run completes n requests, each keeping the window full, with the given
// outcome and latency.
func run(l *Limiter, clk *fakeClock, n int, o Outcome, lat time.Duration) {
	for i := 0; i < n; i++ {
		// Fill the window, then finish one request.
		for l.Stats().InFlight < l.Stats().Limit {
			l.Acquire(context.Background())
		}
		clk.Add(lat)
		l.Release(o, lat, true)
	}
}

// drain ends every request in flight without a signal.
func drain(l *Limiter) {
	for l.Stats().InFlight > 0 {
		l.Release(Failed, 0, false)
	}
}

// throttle runs one request that the store throttles.
func throttle(l *Limiter) {
	drain(l)
	l.Acquire(context.Background())
	l.Release(Throttled, 0, false)
}

func TestGrowsWhileBusyAndHalvesOnThrottling(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	l := New(Options{Min: 2, Max: 64, Initial: 8, Now: clk.Now})
	run(l, clk, 40, OK, 100*time.Millisecond)
	grown := l.Stats().Limit
	if grown < 40 {
		t.Fatalf("window %d after 40 successes in slow start, want it to have grown by about one per success from 8", grown)
	}
	clk.Add(time.Second)
	throttle(l)
	if got := l.Stats().Limit; got > grown/2+1 {
		t.Fatalf("window %d after a throttle from %d, want about half", got, grown)
	}
	// A burst of throttles within one round trip is one signal.
	half := l.Stats().Limit
	for i := 0; i < 10; i++ {
		throttle(l)
	}
	if got := l.Stats().Limit; got < half/2 {
		t.Fatalf("window %d after one burst of throttles from %d: decreased more than once", got, half)
	}
	// After a decrease growth is additive: one slot per window.
	atThrottle := l.Stats().Limit
	run(l, clk, 4*atThrottle, OK, 100*time.Millisecond)
	drain(l)
	if got := l.Stats().Limit; got > atThrottle+6 {
		t.Fatalf("window went from %d to %d in four windows of successes after a throttle: not additive", atThrottle, got)
	}
	run(l, clk, 10000, OK, 100*time.Millisecond)
	drain(l)
	if got := l.Stats().Limit; got != 64 {
		t.Fatalf("window %d, want the maximum 64 after many successes", got)
	}
	for i := 0; i < 20; i++ {
		clk.Add(time.Second)
		throttle(l)
	}
	if got := l.Stats().Limit; got != 2 {
		t.Fatalf("window %d under sustained throttling, want the minimum 2", got)
	}
}

func TestShrinksWhenRequestsQueue(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	l := New(Options{Min: 2, Max: 64, Initial: 32, Now: clk.Now})
	run(l, clk, 50, OK, 20*time.Millisecond)
	drain(l)
	before := l.Stats().Limit
	run(l, clk, 200, OK, 2*time.Second) // the store now takes 100× longer: queueing
	drain(l)
	if got := l.Stats().Limit; got >= before {
		t.Fatalf("window %d stayed at or above %d while latency rose 100-fold", got, before)
	}
}

func TestIdleWindowDoesNotGrow(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	l := New(Options{Min: 2, Max: 64, Initial: 8, Now: clk.Now})
	for i := 0; i < 1000; i++ { // one request at a time: the window is not the limit
		l.Acquire(context.Background())
		l.Release(OK, 10*time.Millisecond, true)
	}
	if got := l.Stats().Limit; got != 8 {
		t.Fatalf("window grew to %d with one request in flight", got)
	}
}

func TestAcquireWaitsAndHonoursContext(t *testing.T) {
	l := New(Options{Min: 1, Max: 1, Initial: 1})
	l.Acquire(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := l.Acquire(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire on a full window = %v, want the context's error", err)
	}
	got := make(chan error, 1)
	go func() { got <- l.Acquire(context.Background()) }()
	l.Release(OK, 0, false)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

func TestOutcomes(t *testing.T) {
	for err, want := range map[error]Outcome{
		nil:                                     OK,
		fmt.Errorf("x: %w", bucket.ErrNotExist): OK,
		fmt.Errorf("x: %w: %w", bucket.ErrUnavailable, bucket.ErrThrottled): Throttled,
		fmt.Errorf("x: %w", bucket.ErrLocal):                                Failed,
		errors.New("other"):                                                 Failed,
	} {
		if got := outcome(err); got != want {
			t.Errorf("outcome(%v) = %v, want %v", err, got, want)
		}
	}
}

func TestWrappedBucketKeepsTheContract(t *testing.T) {
	fb, err := filebucket.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	l := New(Options{Max: 4})
	w := Wrap(fb, l)
	if _, ok := w.(bucket.Multipart); ok {
		t.Fatal("the wrapper claims multipart support the file bucket lacks")
	}
	buckettest.Run(t, w)
	if s := l.Stats(); s.InFlight != 0 || s.MaxInFlight == 0 || s.MaxInFlight > 4 {
		t.Fatalf("stats after the suite: %+v", s)
	}
	if !strings.Contains(w.String(), "file://") {
		t.Fatal(w.String())
	}
}

// batchOnly is a bucket that deletes in batches but has no multipart uploads.
type batchOnly struct {
	bucket.Bucket
	batches int
}

func (b *batchOnly) DeleteMany(ctx context.Context, keys []string) error {
	b.batches++
	for _, k := range keys {
		if err := b.Delete(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

func TestWrapKeepsBatchDeleteWithoutMultipart(t *testing.T) {
	fb, err := filebucket.New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	inner := &batchOnly{Bucket: fb}
	l := New(Options{Max: 4})
	w := Wrap(inner, l)
	bd, ok := w.(bucket.BatchDeleter)
	if !ok {
		t.Fatal("the wrapper dropped DeleteMany")
	}
	if _, ok := w.(bucket.Multipart); ok {
		t.Fatal("the wrapper claims multipart support the bucket lacks")
	}
	ctx := context.Background()
	if _, err := w.Put(ctx, "a", strings.NewReader("x"), 1, bucket.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := bd.DeleteMany(ctx, []string{"a"}); err != nil {
		t.Fatal(err)
	}
	if inner.batches != 1 {
		t.Fatalf("batches = %d, want 1", inner.batches)
	}
	if _, err := w.Stat(ctx, "a"); !bucket.IsNotExist(err) {
		t.Fatalf("stat after DeleteMany: %v", err)
	}
	if s := l.Stats(); s.InFlight != 0 {
		t.Fatalf("stats after DeleteMany: %+v", s)
	}
}
