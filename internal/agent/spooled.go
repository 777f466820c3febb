package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/protocol"
)

// spoolView reads the spool directory for status, wait and the GC roots.
// It remembers the paths of spool files already read: a spool file never
// changes once it is in place, and status is asked for often (agentctl
// wait polls it), so each file is read once.
type spoolView struct {
	dir   string
	log   *slog.Logger
	mu    sync.Mutex
	paths map[string]spool.Entry // spool file → its paths and derivation
	odd   map[string]bool        // odd entries already warned about
}

// held returns the paths whose GC roots the spool needs (see list).
func (v *spoolView) held() []string {
	_, held := v.list()
	return held
}

// spooled lists the requests waiting in the spool directory (requests the
// hook could not hand to agentd). held are the paths whose GC roots the
// spool needs: the paths and derivations of the waiting requests and of the
// requests set aside (*.bad: kept for an operator, who may import them
// again by renaming them back). An unreadable file counts as a request without paths until the
// next import sets it aside.
func (v *spoolView) list() (s protocol.Spooled, held []string) {
	l, err := spool.Scan(v.dir)
	if err != nil {
		v.log.Warn("list spool", "dir", v.dir, "err", err)
		return s, nil
	}
	v.noteOdd(l.Odd)
	if len(l.Files)+len(l.Bad) == 0 {
		return s, nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.paths == nil {
		v.paths = map[string]spool.Entry{}
	}
	seen := make(map[string]spool.Entry, len(l.Files)+len(l.Bad))
	read := func(f string) spool.Entry {
		e, ok := v.paths[f]
		if !ok {
			e, _ = spool.Read(f)
			e = spool.Entry{Paths: e.Paths, Drv: e.Drv}
		}
		seen[f] = e
		if e.Drv != "" {
			held = append(held, e.Drv)
		}
		held = append(held, e.Paths...)
		return e
	}
	for _, f := range l.Files {
		s.Paths += len(read(f).Paths)
	}
	for _, f := range l.Bad {
		read(f)
	}
	v.paths = seen
	s.Files = len(l.Files)
	if len(l.Files) > 0 {
		s.OldestAt = spoolFileTime(l.Files[0]).Unix() // files are sorted oldest first
	}
	return s, held
}

// noteOdd warns, once per entry, about entries in the spool directory that
// no writer of the spool makes (symlinks, directories, other names): they
// are never read, and an operator should know they are there.
func (v *spoolView) noteOdd(odd []string) {
	if len(odd) == 0 {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.odd == nil {
		v.odd = map[string]bool{}
	}
	for _, f := range odd {
		if !v.odd[f] {
			v.odd[f] = true
			v.log.Warn("spool directory entry ignored: not a spool file (symlinks, directories and other names are never read)", "entry", f)
		}
	}
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
