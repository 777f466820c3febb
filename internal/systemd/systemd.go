// Package systemd connects agentd to systemd through go-systemd: the
// socket-activated listener, and sd_notify messages (READY, STATUS,
// WATCHDOG, STOPPING). Outside systemd every function is a harmless no-op.
package systemd

import (
	"fmt"
	"net"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Listener returns the socket systemd passed (LISTEN_FDS), or nil if agentd
// was not socket-activated. Exactly one stream socket is expected.
func Listener() (net.Listener, error) {
	ls, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	switch {
	case len(ls) == 0:
		return nil, nil
	case len(ls) > 1:
		return nil, fmt.Errorf("socket activation: got %d sockets, want 1", len(ls))
	case ls[0] == nil:
		return nil, fmt.Errorf("socket activation: the passed file descriptor is not a stream listener")
	}
	return ls[0], nil
}

// Ready tells systemd that start-up finished (Type=notify).
func Ready() { daemon.SdNotify(false, daemon.SdNotifyReady) }

// Stopping tells systemd that shutdown began.
func Stopping() { daemon.SdNotify(false, daemon.SdNotifyStopping) }

// Status sets the one-line status `systemctl status` shows.
func Status(s string) { daemon.SdNotify(false, "STATUS="+s) }

// Watchdog pings the service watchdog.
func Watchdog() { daemon.SdNotify(false, daemon.SdNotifyWatchdog) }

// WatchdogInterval returns how often to ping (half of WATCHDOG_USEC), or 0
// if the watchdog is off.
func WatchdogInterval() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil || d <= 0 {
		return 0
	}
	return d / 2
}
