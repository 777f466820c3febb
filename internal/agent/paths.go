package agent

import (
	"fmt"

	"github.com/nixspool/nixspool/storepath"
)

// maxRequestPaths bounds the paths one request may queue.
const maxRequestPaths = 100000

// storePaths are paths checked to be store paths, once, where they entered
// agentd (parsePaths, sortPaths): what holds one checks nothing again.
type storePaths []string

// drvPath is a derivation's store path, checked by parseDrv, or "".
type drvPath string

// RefusedError is a path refused for what it is (not a store path, not
// valid in the store), as opposed to a failure to check it.
type RefusedError struct{ Err error }

func (e *RefusedError) Error() string { return "refused: " + e.Err.Error() }
func (e *RefusedError) Unwrap() error { return e.Err }

// parsePaths checks that every one of raw is a store path; the first that
// is not refuses them all.
func parsePaths(storeDir string, raw []string) (storePaths, error) {
	for _, p := range raw {
		if err := storepath.Check(storeDir, p); err != nil {
			return nil, &RefusedError{err}
		}
	}
	return storePaths(raw), nil
}

// sortPaths keeps those of raw that are store paths, and returns the
// others with the reason of each.
func sortPaths(storeDir string, raw []string) (good storePaths, bad map[string]error) {
	for _, p := range raw {
		if err := storepath.Check(storeDir, p); err != nil {
			if bad == nil {
				bad = map[string]error{}
			}
			bad[p] = err
			continue
		}
		good = append(good, p)
	}
	return good, bad
}

// parseDrv checks that raw, unless empty, is a store path.
func parseDrv(storeDir, raw string) (drvPath, error) {
	if raw != "" && storepath.Check(storeDir, raw) != nil {
		return "", &RefusedError{fmt.Errorf("drv %q is not a store path", raw)}
	}
	return drvPath(raw), nil
}

// parseRequest checks a request's paths and derivation.
func parseRequest(storeDir string, raw []string, rawDrv string) (storePaths, drvPath, error) {
	if len(raw) > maxRequestPaths {
		return nil, "", tooMany(len(raw))
	}
	paths, err := parsePaths(storeDir, raw)
	if err != nil {
		return nil, "", err
	}
	drv, err := parseDrv(storeDir, rawDrv)
	return paths, drv, err
}

func tooMany(n int) error {
	return &RefusedError{fmt.Errorf("too many paths in one request (%d > %d)", n, maxRequestPaths)}
}

// union returns paths with those of more it lacks appended.
func (p storePaths) union(more storePaths) storePaths {
	have := make(map[string]bool, len(p))
	for _, x := range p {
		have[x] = true
	}
	for _, x := range more {
		if !have[x] {
			have[x] = true
			p = append(p, x)
		}
	}
	return p
}
