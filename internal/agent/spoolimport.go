package agent

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/spool"
	"github.com/nixspool/nixspool/internal/statedir"
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

// importSpool queues the requests the hook spooled while agentd was away,
// file by file, oldest first. A file is removed only after its paths are
// committed; paths that are not valid store paths are logged and dropped; a
// file that cannot be parsed is renamed *.bad and kept for inspection. A
// file the Nix daemon answers with an error is tried again at the next
// imports, and renamed *.bad after maxSpoolAttempts of them; the files
// behind it are imported meanwhile. When the daemon cannot be reached or
// the queue cannot commit, no file can be imported: the import stops until
// the next one, and no file is charged an attempt.
func (a *Agent) importSpool(ctx context.Context) {
	dir := a.spoolDir()
	spool.RemoveStaleTemps(dir, time.Hour)
	l, err := spool.Scan(dir)
	if err != nil {
		a.log.Error("list spool", "dir", dir, "err", err)
		return
	}
	a.spool.noteOdd(l.Odd)
	files := l.Files
	defer a.spoolTries.keepOnly(files)
	for _, f := range files {
		a.spoolBeat.Store(time.Now().UnixNano())
		if ctx.Err() != nil {
			return
		}
		err := a.importSpoolFile(ctx, f)
		if err == nil {
			a.spoolTries.forget(f)
			continue
		}
		if !fileAtFault(err) {
			a.log.Warn("spool import postponed", "file", f, "err", err)
			return
		}
		n := a.spoolTries.failed(f)
		if n < maxSpoolAttempts {
			a.log.Warn("spool file not imported; tried again later, the files behind it now", "file", f, "attempt", n, "max_attempts", maxSpoolAttempts, "err", err)
			continue
		}
		if qerr := spool.Quarantine(f); qerr != nil {
			a.log.Error("spool file not imported after repeated attempts, and it could not be renamed to .bad; tried again at the next import", "file", f, "attempts", n, "reason", err, "err", qerr)
			continue
		}
		a.spoolTries.forget(f)
		a.log.Error("spool file not imported after repeated attempts; renamed to .bad", "file", f, "attempts", n, "reason", err)
	}
}

// importSpoolFile imports one spool file. It returns nil once the file is
// dealt with: imported and removed, or renamed *.bad if unreadable.
func (a *Agent) importSpoolFile(ctx context.Context, f string) error {
	ctx, cancel := context.WithTimeout(ctx, a.spoolFileTimeout())
	defer cancel()
	e, err := spool.Read(f)
	if err != nil {
		if qerr := spool.Quarantine(f); qerr != nil {
			a.log.Error("unreadable spool file, and it could not be renamed to .bad; tried again at the next import", "file", f, "err", err, "rename_err", qerr)
			return nil
		}
		a.log.Error("unreadable spool file; renamed to .bad", "file", f, "err", err)
		return nil
	}
	n, err := a.intake.spooled(ctx, f, e.Paths, e.Drv, e.Floating)
	if err != nil {
		return err
	}
	if err := spool.Remove(f); err != nil {
		a.log.Error("remove imported spool file", "file", f, "err", err)
		return nil // committed: importing it again changes nothing
	}
	a.log.Info("imported spool file", "file", f, "paths", n)
	if e.Drv != "" {
		// The hook rooted the derivation while the request was spooled;
		// queued requests keep their derivations as hooks that reach
		// agentd do.
		if err := a.roots.unrootSpooled(e.Drv); err != nil {
			a.log.Warn("remove gc root", "path", e.Drv, "err", err)
		}
	}
	return nil
}

// spoolFileTimeout bounds the import of one spool file: a Nix daemon that
// stops answering postpones the import instead of holding it.
func (a *Agent) spoolFileTimeout() time.Duration {
	if a.spoolFileBound > 0 {
		return a.spoolFileBound
	}
	return defaultSpoolFileTimeout
}

func (a *Agent) spoolDir() string { return statedir.Dir(a.cfg.StateDir).Spool() }
