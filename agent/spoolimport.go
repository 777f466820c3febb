package agent

import (
	"errors"
	"sync"
	"time"

	"github.com/nixspool/nixspool/nixstore"
)

// maxSpoolAttempts is how many imports a spool file the Nix daemon answers
// with an error gets before it is renamed *.bad.
const maxSpoolAttempts = 10

// defaultSpoolFileTimeout bounds the Nix daemon's answers for one spool
// file (its paths' validity, a floating derivation's outputs): well under
// the watchdog's patience for a spool import that makes no progress.
const defaultSpoolFileTimeout = time.Minute

// fileAtFault reports whether an import failed for the file's own sake:
// the Nix daemon answered, with an error about what the file asks (a
// derivation collected while agentd was away, say). Other failures (the
// daemon or the queue unavailable) would fail every file alike.
func fileAtFault(err error) bool {
	var de *nixstore.DaemonError
	return errors.As(err, &de)
}

// spoolAttempts counts the failed imports of spool files. The counts live
// in memory: after a restart every file gets its attempts afresh.
type spoolAttempts struct {
	mu sync.Mutex
	n  map[string]int
}

// failed counts one more failed import of file and returns the count.
func (s *spoolAttempts) failed(file string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n == nil {
		s.n = map[string]int{}
	}
	s.n[file]++
	return s.n[file]
}

// forget drops the count of file (imported, or renamed).
func (s *spoolAttempts) forget(file string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.n, file)
}

// keepOnly drops the counts of files not in files (removed meanwhile).
func (s *spoolAttempts) keepOnly(files []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.n) == 0 {
		return
	}
	listed := make(map[string]bool, len(files))
	for _, f := range files {
		listed[f] = true
	}
	for f := range s.n {
		if !listed[f] {
			delete(s.n, f)
		}
	}
}
