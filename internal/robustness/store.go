package robustness

import (
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/nar"
)

// nixStore stands in for the local Nix store: paths with real contents in
// a directory, registered with the metadata Nix would record (NarHash,
// NarSize, references). A path can grow after it was registered, as a
// store path written to by a misbehaving process does.
type nixStore struct {
	dir string

	mu    sync.Mutex
	infos map[string]*nixstore.PathInfo
	paths []string // in creation order: references point backwards
	data  map[string][]byte
	grown map[string]bool
}

// newNixStore makes n paths; each references a few earlier ones. Most
// are small; a few are over 1 MiB (compressed through a temp file).
func newNixStore(dir string, n int, r *rand.Rand) (*nixStore, error) {
	s := &nixStore{dir: dir, infos: map[string]*nixstore.PathInfo{}, data: map[string][]byte{}, grown: map[string]bool{}}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	for i := 0; i < n; i++ {
		sum := sha256.Sum256(fmt.Appendf(nil, "robustness-%d-%d", r.Uint64(), i))
		p := filepath.Join(dir, nixbase32.EncodeToString(sum[:20])+fmt.Sprintf("-p%d", i))
		size := 64 + r.IntN(16<<10)
		if r.IntN(25) == 0 {
			size = 1<<20 + r.IntN(512<<10)
		}
		data := make([]byte, size)
		for j := range data {
			// Compressible, but not trivially: a NAR of text-like bytes.
			data[j] = byte('a' + r.IntN(8))
		}
		var refs []string
		if i > 0 {
			for k := r.IntN(4); k > 0; k-- {
				refs = append(refs, s.paths[r.IntN(i)])
			}
		}
		if r.IntN(10) == 0 {
			refs = append(refs, p) // a self-reference, as many outputs have
		}
		info, err := s.register(p, data, dedup(refs))
		if err != nil {
			return nil, err
		}
		s.infos[p] = info
		s.paths = append(s.paths, p)
	}
	return s, nil
}

func dedup(in []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

func (s *nixStore) register(p string, data []byte, refs []string) (*nixstore.PathInfo, error) {
	if err := os.WriteFile(p, data, 0o644); err != nil {
		return nil, err
	}
	s.data[p] = data
	h := sha256.New()
	size, _, err := nar.Dump(h, p, false)
	if err != nil {
		return nil, err
	}
	return &nixstore.PathInfo{Path: p, NarHash: h.Sum(nil), NarSize: uint64(size), References: refs}, nil
}

// grow appends to p's file behind Nix's back: its NAR no longer matches
// what was registered, and is far larger.
func (s *nixStore) grow(p string, by int) error {
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(make([]byte, by)); err != nil {
		return err
	}
	s.mu.Lock()
	s.grown[p] = true
	s.mu.Unlock()
	return nil
}

// rebuild writes p's registered contents again (the path was deleted and
// built again).
func (s *nixStore) rebuild(p string) error {
	s.mu.Lock()
	data := s.data[p]
	delete(s.grown, p)
	s.mu.Unlock()
	return os.WriteFile(p, data, 0o644)
}

func (s *nixStore) isGrown(p string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.grown[p]
}

// QueryPathInfo implements uploader.MetadataSource.
func (s *nixStore) QueryPathInfo(_ context.Context, p string) (*nixstore.PathInfo, error) {
	return s.infos[p], nil
}

// Closure implements uploader.MetadataSource.
func (s *nixStore) Closure(_ context.Context, p string) ([]*nixstore.PathInfo, error) {
	return nixstore.ClosureIn(s.infos, p)
}

// closure returns the paths of p's closure.
func (s *nixStore) closure(p string) []string {
	infos, _ := s.Closure(context.Background(), p)
	out := make([]string, len(infos))
	for i, info := range infos {
		out[i] = info.Path
	}
	return out
}
