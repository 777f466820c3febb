// Package nixroots keeps queued store paths alive: while a path waits for
// upload, a symlink to it in a directory under /nix/var/nix/gcroots/ makes it
// a garbage-collector root, so `nix-collect-garbage` cannot delete it.
//
// Two programs write the directory: agentd roots every path it queues, and
// the post-build hook roots the paths it spools while agentd is away (agentd
// takes those roots over when it imports the spool). A root is named after
// the store path's base name, so both agree on it and adding is idempotent.
//
// New roots are durable before Add returns (the symlink is renamed into
// place and the directory fsynced): after a power loss a root must not be
// missing for a path whose request was acknowledged or spooled. Concurrent
// adds share directory syncs. Removals are
// not synced: a root that comes back after a crash only keeps a path alive
// until agentd reconciles the directory at its next start.
//
// A root may be shared: the hook may find the root of a path agentd is
// about to release and spool a request for that path. The directory's lock
// orders the two: the hook holds it shared from rooting until its spool file
// is in place, and agentd holds it exclusively while it decides, from the
// spool and the queue, which roots to remove and removes them.
package nixroots

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixspool/nixspool/internal/atomicfile"
)

// DefaultDir is where agentd keeps its roots.
const DefaultDir = "/nix/var/nix/gcroots/nixspool"

// Roots manages the root symlinks in one directory. A Roots with an empty
// directory is disabled: every method does nothing.
type Roots struct {
	dir  string
	sync dirSyncer
}

// New returns the roots kept in dir ("" disables them), creating dir.
func New(dir string) (*Roots, error) {
	if dir == "" {
		return &Roots{}, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("gc roots: %w", err)
	}
	return &Roots{dir: dir, sync: dirSyncer{syncDir: atomicfile.SyncDir}}, nil
}

// Enabled reports whether roots are kept.
func (r *Roots) Enabled() bool { return r.dir != "" }

// Dir is the roots directory ("" when disabled).
func (r *Roots) Dir() string { return r.dir }

// Lock takes the directory's lock (see the package comment), shared or
// exclusive, waiting at most wait for it. It returns the function that
// releases it. A disabled Roots has nothing to lock.
func (r *Roots) Lock(exclusive bool, wait time.Duration) (unlock func(), err error) {
	if r.dir == "" {
		return func() {}, nil
	}
	f, err := os.Open(r.dir)
	if err != nil {
		return nil, fmt.Errorf("gc roots: lock %s: %w", r.dir, err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	deadline := time.Now().Add(wait)
	for {
		err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			break
		}
		if time.Now().After(deadline) {
			err = fmt.Errorf("held by another process for %s", wait)
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	f.Close()
	return nil, fmt.Errorf("gc roots: lock %s: %w", r.dir, err)
}

// Add makes storePath a GC root, durably. It is idempotent.
func (r *Roots) Add(storePath string) error { return r.AddAll([]string{storePath}) }

// AddAll makes every path a GC root and syncs the directory once, if a root
// was created.
func (r *Roots) AddAll(paths []string) error { return r.AddNamed(Named(paths)) }

// Named names the roots of paths as Add does: after their base names.
func Named(paths []string) map[string]string {
	m := make(map[string]string, len(paths))
	for _, p := range paths {
		m[filepath.Base(p)] = p
	}
	return m
}

// DerivationRoot is the name of the root that keeps the derivation drv
// alive for the job of path: one per derivation and path, so that the job
// of one output of a derivation releases only its own.
func DerivationRoot(drv, path string) string {
	hash, _, _ := strings.Cut(filepath.Base(path), "-")
	return filepath.Base(drv) + "@" + hash
}

// AddNamed makes each target a GC root under its name (name → target) and
// syncs the directory once, if a root was created.
func (r *Roots) AddNamed(roots map[string]string) error {
	if r.dir == "" {
		return nil
	}
	created := false
	for name, target := range roots {
		made, err := r.link(name, target)
		if err != nil {
			return err
		}
		created = created || made
	}
	if !created {
		return nil
	}
	if err := r.sync.sync(r.dir); err != nil {
		return fmt.Errorf("gc roots: sync %s: %w", r.dir, err)
	}
	return nil
}

// dirSyncer shares directory fsyncs between concurrent callers, as the
// queue shares commits: a caller needs a sync that starts after its call
// (its links are in place by then); while one sync runs, every caller that
// arrives waits for it to end and then for one more sync, which all of them
// share. Concurrent hooks thus cost two directory syncs, not one each (on
// ext4 each is a journal commit, and they do not overlap).
type dirSyncer struct {
	syncDir func(dir string) error

	mu      sync.Mutex
	cond    *sync.Cond
	started uint64 // syncs started
	done    uint64 // the last sync finished
	running bool
	err     error // outcome of sync done
	waiting int   // callers waiting for another's sync (for tests)
	count   int   // syncs made (for tests)
}

func (s *dirSyncer) sync(dir string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cond == nil {
		s.cond = sync.NewCond(&s.mu)
	}
	// Any sync started from now on covers the caller's links; the latest
	// finished one has started after any earlier one.
	need := s.started + 1
	for s.done < need {
		if s.running {
			s.waiting++
			s.cond.Wait()
			s.waiting--
			continue
		}
		s.running = true
		s.started++
		gen := s.started
		s.count++
		s.mu.Unlock()
		err := s.syncDir(dir)
		s.mu.Lock()
		s.running, s.done, s.err = false, gen, err
		s.cond.Broadcast()
	}
	return s.err
}

// link creates the root symlink name to storePath unless it exists, and
// reports whether it created one.
func (r *Roots) link(name, storePath string) (bool, error) {
	link := filepath.Join(r.dir, name)
	if target, err := os.Readlink(link); err == nil && target == storePath {
		return false, nil
	}
	// A per-process temp name: the hook and agentd may root the same path
	// at the same time.
	tmp := fmt.Sprintf("%s.tmp-%d", link, os.Getpid())
	os.Remove(tmp)
	if err := os.Symlink(storePath, tmp); err != nil {
		return false, fmt.Errorf("gc root for %s: %w", storePath, err)
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return false, fmt.Errorf("gc root for %s: %w", storePath, err)
	}
	return true, nil
}

// Remove drops the root for storePath; a missing root is not an error.
func (r *Roots) Remove(storePath string) error { return r.RemoveNamed(filepath.Base(storePath)) }

// RemoveNamed drops the root called name; a missing root is not an error.
func (r *Roots) RemoveNamed(name string) error {
	if r.dir == "" {
		return nil
	}
	err := os.Remove(filepath.Join(r.dir, name))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove gc root %s: %w", name, err)
	}
	return nil
}

// Reconcile makes the directory hold the roots keep (name → target): it
// adds missing ones (e.g. lost in a crash) and removes the others, except
// those created less than spare ago: a hook may have just rooted paths for
// a request it is about to spool.
func (r *Roots) Reconcile(want map[string]string, spare time.Duration) (added, removed int, err error) {
	if r.dir == "" {
		return 0, 0, nil
	}
	ents, err := os.ReadDir(r.dir)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range ents {
		if _, ok := want[e.Name()]; ok {
			continue
		}
		if fi, err := e.Info(); err != nil || time.Since(fi.ModTime()) < spare {
			continue
		}
		if os.Remove(filepath.Join(r.dir, e.Name())) == nil {
			removed++
		}
	}
	missing := map[string]string{}
	for name, p := range want {
		if _, err := os.Lstat(filepath.Join(r.dir, name)); err != nil {
			missing[name] = p
		}
	}
	if err := r.AddNamed(missing); err != nil {
		return 0, removed, err
	}
	return len(missing), removed, nil
}
