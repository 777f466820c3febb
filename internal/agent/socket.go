package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nixspool/nixspool/internal/systemd"
)

// listen takes the socket-activated listener, or creates the socket: in a
// 0750 directory (created if missing), mode 0660, owned by the socket group.
// A stale socket file is replaced only if nothing answers on it.
func (a *Agent) listen() error {
	l, err := systemd.Listener()
	if err != nil {
		return err
	}
	if l != nil {
		a.listener = l
		a.access.socket = groupOfGID(socketGID(l.Addr().String()))
		a.log.Info("using socket-activated listener", "socket", l.Addr().String())
		return nil
	}
	path := a.cfg.Socket
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return fmt.Errorf("socket directory: %w", err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("socket %s: exists and is not a socket; refusing to replace it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return fmt.Errorf("socket %s: another agentd is listening on it", path)
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("remove stale socket: %w", err)
		}
	}
	var sockGroup group
	if a.cfg.SocketGroup != "" {
		if sockGroup, err = lookupGroup("--socket-group", a.cfg.SocketGroup); err != nil {
			return err
		}
	}
	gid := -1
	if sockGroup.set {
		gid = sockGroup.gid
	}
	// Create the socket with no access for others from the first instant.
	old := syscall.Umask(0o117)
	l, err = net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return fmt.Errorf("chown socket to group %s: %w", a.cfg.SocketGroup, err)
		}
		if err := os.Chown(dir, -1, gid); err != nil {
			a.log.Warn("cannot give the socket group access to the socket directory", "dir", dir, "err", err)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return err
	}
	a.listener = l
	a.access.socket = sockGroup
	return nil
}

func socketGID(path string) int {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return -1
	}
	return int(st.Gid)
}
