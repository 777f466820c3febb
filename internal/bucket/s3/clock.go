package s3

import (
	"net/http"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/bucket"
)

// clockEpoch is how long a sample of the store's clock is preferred for
// its round trip: the estimate uses the lowest-round-trip sample of the
// current epoch and the one before, so it follows a clock that drifts or
// steps, and no sample older than two epochs is used while requests go on.
const clockEpoch = 5 * time.Minute

// clockDrift is how fast the estimate is assumed to age (100 ppm: far more
// than two NTP-disciplined clocks drift apart).
const clockDrift = 100e-6

// clockSample is one measurement of the store's clock: the Date header of
// an answer to a request sent at local instant sent and answered at recv.
type clockSample struct {
	offset time.Duration // store's clock minus local clock
	rtt    time.Duration
	at     time.Time // local, when the answer came
}

// storeClock estimates the store's clock from the Date headers of answers
// to requests without a body. The Date header is stamped somewhere between
// sending the request and receiving the answer's headers, with one-second
// resolution, so a sample's error is at most half its round trip plus half
// a second. A request with a body is not used: the store stamps Date after
// receiving the body, and a long upload gives a long round trip.
type storeClock struct {
	mu        sync.Mutex
	epoch     time.Time // local, when the current epoch began
	cur, prev *clockSample
}

// bodiless reports whether req carries no body, so that its answer's Date
// is a sample worth taking. A GET's round trip ends with the answer's
// headers, before its body, so big GETs are samples as good as HEADs.
func bodiless(req *http.Request) bool {
	return req.Body == nil || req.Body == http.NoBody
}

// observe records the Date header of an answer.
func (c *storeClock) observe(sent, recv, date time.Time) {
	rtt := max(recv.Sub(sent), 0)
	mid := sent.Add(rtt / 2)
	s := &clockSample{offset: date.Add(500 * time.Millisecond).Sub(mid), rtt: rtt, at: recv}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch since := recv.Sub(c.epoch); {
	case c.cur == nil:
		c.epoch = recv
	case since >= 2*clockEpoch:
		c.epoch, c.prev, c.cur = recv, nil, nil
	case since >= clockEpoch:
		c.epoch, c.prev, c.cur = recv, c.cur, nil
	}
	if c.cur == nil || s.rtt <= c.cur.rtt {
		c.cur = s
	}
}

// estimate returns the store's clock at local instant now and a bound on
// its error: half the sample's round trip, the Date header's resolution
// with half a second to spare, and the drift since the sample. ok is false
// before any sample.
func (c *storeClock) estimate(now time.Time) (t time.Time, bound time.Duration, ok bool) {
	c.mu.Lock()
	s := c.cur
	if p := c.prev; s == nil || (p != nil && p.rtt < s.rtt) {
		s = p
	}
	c.mu.Unlock()
	if s == nil {
		return now, bucket.UnknownClockBound, false
	}
	age := max(now.Sub(s.at), 0)
	bound = s.rtt/2 + time.Second + time.Duration(float64(age)*clockDrift)
	return now.Add(s.offset), bound, true
}
