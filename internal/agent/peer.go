package agent

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"
)

// peer is the process at the other end of a connection, as the kernel
// recorded it when that process connected: its uid, primary gid, pid and
// supplementary groups. The pid may be reused by the time a request is
// read; nothing decides on it, it only goes to the log.
type peer struct {
	uid, gid, pid int
	groups        []int // supplementary groups (SO_PEERGROUPS)
	known         bool
}

// inGroup reports whether g is the peer's primary group or one of its
// supplementary groups.
func (p peer) inGroup(g group) bool {
	return g.set && p.known && (p.gid == g.gid || slices.Contains(p.groups, g.gid))
}

// errNoPeerGroups is peerOf's error when the peer is known but its
// supplementary groups are not (a kernel before Linux 4.13): only its
// primary group counts then.
var errNoPeerGroups = errors.New("supplementary groups of the peer unknown (SO_PEERGROUPS); only its primary group counts")

// peerOf reads the credentials of c's peer from the kernel: SO_PEERCRED
// and SO_PEERGROUPS, both as they were at connect(2). Without SO_PEERCRED
// the peer is unknown and may only read; without SO_PEERGROUPS it is known
// with its primary group only, and the error wraps errNoPeerGroups.
func peerOf(c net.Conn) (peer, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return peer{}, fmt.Errorf("not a unix socket connection (%T)", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	var (
		cred   *unix.Ucred
		groups []int
		gerr   error
	)
	cerr := raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err == nil {
			groups, gerr = peerGroups(int(fd))
		}
	})
	if cerr != nil {
		return peer{}, fmt.Errorf("peer credentials: %w", cerr)
	}
	if err != nil {
		return peer{}, fmt.Errorf("peer credentials (SO_PEERCRED): %w", err)
	}
	p := peer{uid: int(cred.Uid), gid: int(cred.Gid), pid: int(cred.Pid), groups: groups, known: true}
	if gerr != nil {
		return p, fmt.Errorf("%w: %w", errNoPeerGroups, gerr)
	}
	return p, nil
}

// peerGroups returns the supplementary groups the peer of the unix socket
// fd had when it connected (SO_PEERGROUPS, Linux 4.13). The kernel answers
// ERANGE with the size it needs when the buffer is too small.
func peerGroups(fd int) ([]int, error) {
	buf := make([]uint32, 64)
	for {
		size := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		if errno == unix.ERANGE && int(size) > len(buf)*4 {
			buf = make([]uint32, size/4)
			continue
		}
		if errno != 0 {
			return nil, errno
		}
		groups := make([]int, 0, size/4)
		for _, g := range buf[:size/4] {
			groups = append(groups, int(g))
		}
		return groups, nil
	}
}
