package agent

import (
	"context"
	"fmt"
	"sync"

	"github.com/nixspool/nixspool/protocol"
)

// Connection limits. Memory held for requests is bounded by
// maxConns × protocol.SmallRequestSize + largeRequests ×
// protocol.MaxRequestSize (4 MiB + 4 MiB), whatever clients send.
const (
	// maxConns bounds the connections served at once.
	maxConns = 64
	// maxConnsPerUID bounds those of one peer uid other than root: the
	// post-build hook runs as root (the Nix daemon), so root's many
	// concurrent hooks count only towards maxConns.
	maxConnsPerUID = 16
	// largeRequests bounds the requests over protocol.SmallRequestSize
	// (a push of many paths) read at once; others wait for a slot.
	largeRequests = 4
)

// connLimits admits connections within the limits and hands out the slots
// for large requests. The zero value is not usable: see newConnLimits.
type connLimits struct {
	total, perUID int
	large         chan struct{}

	mu    sync.Mutex
	n     int
	byUID map[int]int
}

func newConnLimits(total, perUID, large int) *connLimits {
	return &connLimits{total: total, perUID: perUID, large: make(chan struct{}, large), byUID: map[int]int{}}
}

// admit takes a connection slot for p, or returns the one-line reason it
// is refused. The caller calls release once the connection is done.
func (l *connLimits) admit(p peer) (release func(), refusal string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n >= l.total {
		return nil, fmt.Sprintf("agentd is busy: %d connections at once (the limit); try again later", l.n)
	}
	limitUID := p.known && p.uid != 0
	if limitUID && l.byUID[p.uid] >= l.perUID {
		return nil, fmt.Sprintf("agentd is busy: uid %d has %d connections at once (the limit per uid); try again later", p.uid, l.byUID[p.uid])
	}
	l.n++
	if limitUID {
		l.byUID[p.uid]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.n--
			if limitUID {
				if l.byUID[p.uid]--; l.byUID[p.uid] == 0 {
					delete(l.byUID, p.uid)
				}
			}
		})
	}, ""
}

// active is the number of connections admitted and not yet released.
func (l *connLimits) active() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// growRequest returns the grow function of protocol.ReadRequestGrowing for
// one connection: it waits for a slot for a large request until ctx is
// done, and records that the slot is taken so that release returns it.
func (l *connLimits) growRequest(ctx context.Context) (grow func() error, release func()) {
	held := false
	grow = func() error {
		select {
		case l.large <- struct{}{}:
			held = true
			return nil
		case <-ctx.Done():
			return fmt.Errorf("agentd is busy reading %d other large requests (over %d bytes); try again later: %w", cap(l.large), protocol.SmallRequestSize, ctx.Err())
		}
	}
	release = func() {
		if held {
			held = false
			<-l.large
		}
	}
	return grow, release
}
