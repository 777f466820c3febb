package agent

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/spool"
)

// spoolCache remembers the paths of spool files already read: a spool file
// never changes once it is in place, and status is asked for often (agentctl
// wait polls it), so each file is read once.
type spoolCache struct {
	mu    sync.Mutex
	paths map[string][]string // spool file → its paths
}

// spooled lists the requests waiting in the spool directory (requests the
// hook could not hand to agentd) and their paths. An unreadable file counts
// as a request without paths until the next import sets it aside.
func (a *Agent) spooled() (protocol.Spooled, []string) {
	var s protocol.Spooled
	files, err := spool.Files(a.spoolDir())
	if err != nil || len(files) == 0 {
		return s, nil
	}
	a.spoolSeen.mu.Lock()
	defer a.spoolSeen.mu.Unlock()
	if a.spoolSeen.paths == nil {
		a.spoolSeen.paths = map[string][]string{}
	}
	seen := make(map[string][]string, len(files))
	var paths []string
	for _, f := range files {
		ps, ok := a.spoolSeen.paths[f]
		if !ok {
			if e, err := spool.Read(f); err == nil {
				ps = e.Paths
			}
		}
		seen[f] = ps
		paths = append(paths, ps...)
	}
	a.spoolSeen.paths = seen
	s.Files, s.Paths = len(files), len(paths)
	s.OldestAt = spoolFileTime(files[0]).Unix() // files are sorted oldest first
	return s, paths
}

// spoolFileTime is when the hook wrote a spool file: its name starts with
// the time in unix nanoseconds (its modification time for other names).
func spoolFileTime(file string) time.Time {
	stamp, _, _ := strings.Cut(filepath.Base(file), "-")
	if ns, err := strconv.ParseInt(stamp, 10, 64); err == nil {
		return time.Unix(0, ns)
	}
	if fi, err := os.Stat(file); err == nil {
		return fi.ModTime()
	}
	return time.Time{}
}
