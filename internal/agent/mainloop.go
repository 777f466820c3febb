package agent

import (
	"context"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/systemd"
	"github.com/nixspool/nixspool/protocol"
)

// mainLoop runs periodic chores until ctx is done: spool imports (the
// first at once), the systemd status line and watchdog pings. The watchdog is pinged from here
// only while the loop and the spool import it started make progress, so that
// a wedged agentd gets the service restarted; a spool import that is merely
// long (a big spool) keeps the pings going file by file.
func (a *Agent) mainLoop(ctx context.Context) {
	spoolTick := time.NewTicker(a.cfg.SpoolInterval)
	defer spoolTick.Stop()
	statusTick := time.NewTicker(5 * time.Second)
	defer statusTick.Stop()
	var wdC <-chan time.Time
	iv := systemd.WatchdogInterval()
	if iv > 0 {
		t := time.NewTicker(iv)
		defer t.Stop()
		wdC = t.C
		systemd.Watchdog()
	}
	a.publishStatus()
	var importing sync.WaitGroup
	defer importing.Wait()
	a.spoolImport.start(ctx, &importing) // what was spooled while agentd was away, right away
	for {
		select {
		case <-ctx.Done():
			return
		case <-spoolTick.C:
			a.spoolImport.start(ctx, &importing)
		case <-statusTick.C:
			a.publishStatus()
		case <-wdC:
			if stalled := a.spoolImport.stalled(max(4*iv, 2*time.Minute)); stalled > 0 {
				a.log.Error("spool import made no progress; not pinging the watchdog", "stalled_for", stalled.Round(time.Second))
				continue
			}
			systemd.Watchdog()
		}
	}
}

// chores runs the periodic checks that must not wait on the main loop:
// whether the cache was reset (its generation), and pruning what grows
// with uptime.
func (a *Agent) chores(ctx context.Context) {
	gen := time.NewTicker(a.cfg.GenerationInterval)
	defer gen.Stop()
	prune := time.NewTicker(10 * time.Minute)
	defer prune.Stop()
	unroots := time.NewTicker(unrootRetryEvery)
	defer unroots.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gen.C:
			if a.breaker.isOpen() {
				continue // the probes check it
			}
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			if err := a.uploader.CheckGeneration(cctx); err != nil {
				a.log.Debug("check cache generation", "err", err)
			}
			cancel()
		case <-prune.C:
			a.uploader.Maintain()
		case <-unroots.C:
			a.roots.retry()
		}
	}
}

func (a *Agent) publishStatus() {
	if s, err := a.status(); err == nil {
		systemd.Status(protocol.Summary(s))
	}
}
