package agent

import (
	"context"
	"sync"

	"github.com/nixspool/nixspool/internal/nixstore"
)

// fakeStore answers the Nix daemon's queries from maps.
type fakeStore struct {
	mu      sync.Mutex
	valid   map[string]bool
	outputs map[string]map[string]string // drv → output name → path
	drvErr  map[string]error             // drv → error of its output map
	// validCalls counts the QueryValidPaths calls.
	validCalls int
}

func (s *fakeStore) QueryValidPaths(ctx context.Context, paths []string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.validCalls++
	var out []string
	for _, p := range paths {
		if s.valid[p] {
			out = append(out, p)
		}
	}
	return out, nil
}

func (s *fakeStore) QueryDerivationOutputMap(ctx context.Context, drv string) (map[string]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.drvErr[drv]; err != nil {
		return nil, err
	}
	return s.outputs[drv], nil
}

func (s *fakeStore) QueryPathInfo(ctx context.Context, p string) (*nixstore.PathInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.valid[p] {
		return nil, nil
	}
	return &nixstore.PathInfo{Path: p, NarSize: 1}, nil
}

func (s *fakeStore) Closure(ctx context.Context, p string) ([]*nixstore.PathInfo, error) {
	info, err := s.QueryPathInfo(ctx, p)
	if err != nil || info == nil {
		return nil, err
	}
	return []*nixstore.PathInfo{info}, nil
}

func (s *fakeStore) Close() error { return nil }
