package agent

import (
	"testing"
	"time"
)

// TestSpoolStallStopsWatchdogPings: a spool import that makes no progress
// for longer than the limit counts as a stall (no watchdog ping, so systemd
// restarts agentd); one that progresses, or none running, does not.
func TestSpoolStallStopsWatchdogPings(t *testing.T) {
	s := &spoolImporter{}
	if d := s.stalled(time.Minute); d != 0 {
		t.Fatalf("no import running, stalled = %v", d)
	}
	s.busy.Store(true)
	s.beat.Store(time.Now().Add(-10 * time.Second).UnixNano())
	if d := s.stalled(time.Minute); d != 0 {
		t.Fatalf("import progressed 10 s ago, stalled = %v", d)
	}
	s.beat.Store(time.Now().Add(-5 * time.Minute).UnixNano())
	if d := s.stalled(time.Minute); d < 4*time.Minute {
		t.Fatalf("import stuck for 5 min, stalled = %v", d)
	}
}
