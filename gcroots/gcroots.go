// Package gcroots keeps queued store paths alive: while a path waits for
// upload, a symlink to it in a directory under /nix/var/nix/gcroots/ makes it
// a garbage-collector root, so `nix-collect-garbage` cannot delete it.
package gcroots

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// DefaultDir is where agentd keeps its roots.
const DefaultDir = "/nix/var/nix/gcroots/nixspool"

// Roots manages the root symlinks in one directory. A Roots with an empty
// directory is disabled: every method does nothing.
type Roots struct {
	dir string
}

// New returns the roots kept in dir ("" disables them), creating dir.
func New(dir string) (*Roots, error) {
	if dir == "" {
		return &Roots{}, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("gc roots: %w", err)
	}
	return &Roots{dir: dir}, nil
}

// Enabled reports whether roots are kept.
func (r *Roots) Enabled() bool { return r.dir != "" }

// Dir is the roots directory ("" when disabled).
func (r *Roots) Dir() string { return r.dir }

// Add makes storePath a GC root. It is idempotent.
func (r *Roots) Add(storePath string) error {
	if r.dir == "" {
		return nil
	}
	link := filepath.Join(r.dir, filepath.Base(storePath))
	if target, err := os.Readlink(link); err == nil && target == storePath {
		return nil
	}
	tmp := link + ".tmp"
	os.Remove(tmp)
	if err := os.Symlink(storePath, tmp); err != nil {
		return fmt.Errorf("gc root for %s: %w", storePath, err)
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("gc root for %s: %w", storePath, err)
	}
	return nil
}

// Remove drops the root for storePath; a missing root is not an error.
func (r *Roots) Remove(storePath string) error {
	if r.dir == "" {
		return nil
	}
	err := os.Remove(filepath.Join(r.dir, filepath.Base(storePath)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove gc root for %s: %w", storePath, err)
	}
	return nil
}

// Reconcile makes the directory hold exactly the roots for keep: it adds
// missing ones (e.g. lost in a crash) and removes stale ones.
func (r *Roots) Reconcile(keep []string) (added, removed int, err error) {
	if r.dir == "" {
		return 0, 0, nil
	}
	want := map[string]string{}
	for _, p := range keep {
		want[filepath.Base(p)] = p
	}
	ents, err := os.ReadDir(r.dir)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range ents {
		if _, ok := want[e.Name()]; !ok {
			if os.Remove(filepath.Join(r.dir, e.Name())) == nil {
				removed++
			}
		}
	}
	for _, p := range want {
		if _, err := os.Lstat(filepath.Join(r.dir, filepath.Base(p))); err == nil {
			continue
		}
		if err := r.Add(p); err != nil {
			return added, removed, err
		}
		added++
	}
	return added, removed, nil
}
