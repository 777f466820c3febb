package s3

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/testenv"
)

// TestClockIgnoresSlowPut: a store stamps Date when it answers, which for
// a PUT is after the body arrived. A slow PUT's answer must not displace
// the estimate a quick HEAD gave, and the bound must cover the error.
func TestClockIgnoresSlowPut(t *testing.T) {
	const putDelay = 2500 * time.Millisecond
	offset := time.Hour + 300*time.Millisecond // the store's clock minus ours
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPut {
			time.Sleep(putDelay) // a long upload: Date is stamped at its end
		}
		w.Header().Set("Date", time.Now().Add(offset).UTC().Format(http.TimeFormat))
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	tr := &retryAfterTransport{base: http.DefaultTransport}
	b := &Bucket{hints: tr}
	client := &http.Client{Transport: tr}
	do := func(method string, body io.Reader) time.Duration {
		t.Helper()
		req, err := http.NewRequestWithContext(context.Background(), method, srv.URL+"/bkt/key", body)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return time.Since(start)
	}

	if _, bound := b.NowWithin(); bound != bucket.UnknownClockBound {
		t.Fatalf("bound before any answer = %v, want %v", bound, bucket.UnknownClockBound)
	}
	do(http.MethodPut, strings.NewReader("body"))
	if _, bound := b.NowWithin(); bound != bucket.UnknownClockBound {
		t.Fatalf("a PUT with a body was taken as a sample of the store's clock (bound %v)", bound)
	}
	head := do(http.MethodHead, nil)
	do(http.MethodPut, strings.NewReader("body"))

	now, bound := b.NowWithin()
	err := now.Sub(time.Now().Add(offset)).Abs()
	// The HEAD's sample: half a second of Date resolution and half its
	// round trip (at most the whole call's).
	if want := 500*time.Millisecond + head/2 + 20*time.Millisecond; err > want {
		t.Errorf("estimate off by %v after a slow PUT, want at most %v", err, want)
	}
	if err > bound {
		t.Errorf("estimate off by %v, beyond its bound %v", err, bound)
	}
	if max := time.Second + head/2 + 20*time.Millisecond; bound > max {
		t.Errorf("bound %v, want at most %v (the HEAD's round trip was %v)", bound, max, head)
	}
	if err := b.Now().Sub(time.Now().Add(offset)).Abs(); err > bound {
		t.Errorf("Now off by %v, beyond the bound %v", err, bound)
	}
}

// TestClockKeepsTheQuickestRecentSample: the estimate comes from the
// sample with the shortest round trip, unless it is more than an epoch or
// two old; then newer samples take over, so a clock that steps is
// followed.
func TestClockKeepsTheQuickestRecentSample(t *testing.T) {
	var c storeClock
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	date := func(local time.Time, off time.Duration) time.Time { return local.Add(off).Truncate(time.Second) }
	// Quick sample, offset +10 s.
	c.observe(t0, t0.Add(20*time.Millisecond), date(t0.Add(10*time.Millisecond), 10*time.Second))
	// Slow sample a minute later, with its Date stamped at the end.
	t1 := t0.Add(time.Minute)
	c.observe(t1, t1.Add(3*time.Second), date(t1.Add(3*time.Second), 10*time.Second))
	now, bound, ok := c.estimate(t1.Add(3 * time.Second))
	if !ok || bound > time.Second+20*time.Millisecond {
		t.Fatalf("bound %v (ok %v): the slow sample displaced the quick one", bound, ok)
	}
	if err := now.Sub(t1.Add(3 * time.Second).Add(10 * time.Second)).Abs(); err > bound {
		t.Fatalf("estimate off by %v, beyond its bound %v", err, bound)
	}
	// The store's clock steps to +20 s; only slow samples come. After two
	// epochs the quick old sample is no longer used.
	for i := 1; i <= 3; i++ {
		ti := t1.Add(time.Duration(i) * clockEpoch)
		c.observe(ti, ti.Add(200*time.Millisecond), date(ti.Add(100*time.Millisecond), 20*time.Second))
	}
	end := t1.Add(3*clockEpoch + 200*time.Millisecond)
	now, bound, _ = c.estimate(end)
	if err := now.Sub(end.Add(20 * time.Second)).Abs(); err > bound {
		t.Fatalf("after the step: estimate off by %v, beyond its bound %v", err, bound)
	}
	if bound < time.Second+100*time.Millisecond {
		t.Fatalf("bound %v is narrower than the sample's round trip allows", bound)
	}
	// An old sample's bound grows with its age.
	_, later, _ := c.estimate(end.Add(10 * time.Hour))
	if later <= bound {
		t.Fatalf("bound %v ten hours on, %v at the sample: it should grow", later, bound)
	}
}

// TestClockAgainstRealStores: on a local server (same clock as ours) a
// HEAD gives an estimate within its bound, and the bound is about a
// second; a PUT does not change it.
func TestClockAgainstRealStores(t *testing.T) {
	forEachS3(t, func(t *testing.T, s testenv.S3Server) {
		b := newTestBucketOn(t, s)
		ctx := context.Background()
		if _, err := b.Put(ctx, "clock", strings.NewReader("x"), 1, bucket.PutOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Stat(ctx, "clock"); err != nil {
			t.Fatal(err)
		}
		now, bound := b.NowWithin()
		if err := time.Until(now).Abs(); err > bound || bound > 1500*time.Millisecond {
			t.Fatalf("estimate off by %v with bound %v", err, bound)
		}
	})
}
