package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/spool"
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

// spoolImporter imports the requests the hook spooled while agentd was
// away. One import runs at a time; the main loop starts them and watches
// their progress.
type spoolImporter struct {
	dir    string
	view   *spoolView // counts odd files for status
	intake *admit
	roots  *rootKeeper
	log    *slog.Logger
	busy   atomic.Bool   // an import is running
	beat   atomic.Int64  // unix ns of its last progress
	tries  spoolAttempts // failed imports of spool files
	// fileBound bounds the import of one spool file (0: the default).
	fileBound time.Duration
}

// start begins an import in the background unless one is running; running
// counts it until it ends.
func (s *spoolImporter) start(ctx context.Context, running *sync.WaitGroup) {
	if !s.busy.CompareAndSwap(false, true) {
		return // the previous import is still running
	}
	s.beat.Store(time.Now().UnixNano())
	running.Add(1)
	go func() {
		defer running.Done()
		defer s.busy.Store(false)
		s.run(ctx)
	}()
}

// stalled returns how long a running import has made no progress, if
// longer than limit; otherwise 0.
func (s *spoolImporter) stalled(limit time.Duration) time.Duration {
	if !s.busy.Load() {
		return 0
	}
	d := time.Since(time.Unix(0, s.beat.Load()))
	if d > limit {
		return d
	}
	return 0
}

// run queues the requests the hook spooled while agentd was away,
// file by file, oldest first. A file is removed only after its paths are
// committed; paths that are not valid store paths are logged and dropped; a
// file that cannot be parsed is renamed *.bad and kept for inspection. A
// file the Nix daemon answers with an error is tried again at the next
// imports, and renamed *.bad after maxSpoolAttempts of them; the files
// behind it are imported meanwhile. When the daemon cannot be reached or
// the queue cannot commit, no file can be imported: the import stops until
// the next one, and no file is charged an attempt.
func (s *spoolImporter) run(ctx context.Context) {
	dir := s.dir
	spool.RemoveStaleTemps(dir, time.Hour)
	l, err := spool.Scan(dir)
	if err != nil {
		s.log.Error("list spool", "dir", dir, "err", err)
		return
	}
	s.view.noteOdd(l.Odd)
	files := l.Files
	defer s.tries.keepOnly(files)
	for _, f := range files {
		s.beat.Store(time.Now().UnixNano())
		if ctx.Err() != nil {
			return
		}
		err := s.importFile(ctx, f)
		if err == nil {
			s.tries.forget(f)
			continue
		}
		if !fileAtFault(err) {
			s.log.Warn("spool import postponed", "file", f, "err", err)
			return
		}
		n := s.tries.failed(f)
		if n < maxSpoolAttempts {
			s.log.Warn("spool file not imported; tried again later, the files behind it now", "file", f, "attempt", n, "max_attempts", maxSpoolAttempts, "err", err)
			continue
		}
		if qerr := spool.Quarantine(f); qerr != nil {
			s.log.Error("spool file not imported after repeated attempts, and it could not be renamed to .bad; tried again at the next import", "file", f, "attempts", n, "reason", err, "err", qerr)
			continue
		}
		s.tries.forget(f)
		s.log.Error("spool file not imported after repeated attempts; renamed to .bad", "file", f, "attempts", n, "reason", err)
	}
}

// importFile imports one spool file. It returns nil once the file is
// dealt with: imported and removed, or renamed *.bad if unreadable.
func (s *spoolImporter) importFile(ctx context.Context, f string) error {
	ctx, cancel := context.WithTimeout(ctx, s.fileTimeout())
	defer cancel()
	e, err := spool.Read(f)
	if err != nil {
		if qerr := spool.Quarantine(f); qerr != nil {
			s.log.Error("unreadable spool file, and it could not be renamed to .bad; tried again at the next import", "file", f, "err", err, "rename_err", qerr)
			return nil
		}
		s.log.Error("unreadable spool file; renamed to .bad", "file", f, "err", err)
		return nil
	}
	n, err := s.intake.spooled(ctx, f, e.Paths, e.Drv, e.Floating)
	if err != nil {
		return err
	}
	if err := spool.Remove(f); err != nil {
		s.log.Error("remove imported spool file", "file", f, "err", err)
		return nil // committed: importing it again changes nothing
	}
	s.log.Info("imported spool file", "file", f, "paths", n)
	if e.Drv != "" {
		// The hook rooted the derivation while the request was spooled;
		// queued requests keep their derivations as hooks that reach
		// agentd do.
		if err := s.roots.unrootSpooled(e.Drv); err != nil {
			s.log.Warn("remove gc root", "path", e.Drv, "err", err)
		}
	}
	return nil
}

// fileTimeout bounds the import of one spool file: a Nix daemon that
// stops answering postpones the import instead of holding it.
func (s *spoolImporter) fileTimeout() time.Duration {
	if s.fileBound > 0 {
		return s.fileBound
	}
	return defaultSpoolFileTimeout
}
