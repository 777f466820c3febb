package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/nixspool/nixspool/internal/queue"
)

// buildClosure returns what building paths needed, as far as this machine
// has it: for a derivation (.drv), its closure (the derivations and
// sources it names, recursively) and the outputs of every derivation in
// it that are valid here; for an output, the same for its deriver. What
// is not here (an output never built or substituted, or collected; an
// output whose deriver is unknown or gone) is left out with a reason in
// skipped, never an error: the rest is still worth uploading.
func (a *Agent) buildClosure(ctx context.Context, paths storePaths) (_ storePaths, skipped []string, err error) {
	var out []string
	seen := map[string]bool{}
	keep := func(p string) {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	var drvs []string
	for _, p := range paths {
		drv := p
		if !strings.HasSuffix(p, ".drv") {
			info, err := a.store.QueryPathInfo(ctx, p)
			if err != nil {
				return nil, nil, err
			}
			if info == nil {
				return nil, nil, &RefusedError{fmt.Errorf("%s is not a valid path in the Nix store", p)}
			}
			if info.Deriver == "" {
				skipped = append(skipped, p+": its deriver is unknown")
				continue
			}
			drv = info.Deriver
		}
		if !slices.Contains(drvs, drv) {
			drvs = append(drvs, drv)
		}
	}
	var candidates []string
	for _, drv := range drvs {
		valid, err := a.intake.store.QueryValidPaths(ctx, []string{drv})
		if err != nil {
			return nil, nil, err
		}
		if len(valid) == 0 {
			skipped = append(skipped, drv+": the derivation is not in the store")
			continue
		}
		infos, err := a.store.Closure(ctx, drv)
		if err != nil {
			return nil, nil, err
		}
		for _, info := range infos {
			keep(info.Path)
			if !strings.HasSuffix(info.Path, ".drv") {
				continue
			}
			outs, err := a.intake.store.QueryDerivationOutputMap(ctx, info.Path)
			if err != nil {
				return nil, nil, fmt.Errorf("outputs of %s: %w", info.Path, err)
			}
			for name, o := range outs {
				if o == "" {
					skipped = append(skipped, fmt.Sprintf("%s!%s: not realised here", info.Path, name))
					continue
				}
				candidates = append(candidates, o)
			}
		}
	}
	if len(candidates) > 0 {
		valid, err := a.intake.store.QueryValidPaths(ctx, candidates)
		if err != nil {
			return nil, nil, err
		}
		here := map[string]bool{}
		for _, v := range valid {
			here[v] = true
		}
		for _, c := range candidates {
			if here[c] {
				keep(c)
			} else if !seen[c] {
				seen[c] = true
				skipped = append(skipped, c+": not in the store")
			}
		}
	}
	slices.Sort(skipped)
	parsed, err := parsePaths(a.cfg.StoreDir, out)
	return parsed, skipped, err
}

// closureQueuer queues the build closures of the derivations hooks hand
// over (--build-closures), one at a time, after the hooks' own paths are
// acknowledged: a burst of hooks costs a fixed number of goroutines, and
// at most its capacity derivations wait. It is best effort: a derivation
// refused because too many wait, or waiting when agentd stops or crashes,
// is not queued (agentctl push --build-closure queues it again).
type closureQueuer struct {
	pending chan string
	queue   func(ctx context.Context, drv string)
}

// maxPendingBuildClosures bounds the derivations waiting for their build
// closure to be queued.
const maxPendingBuildClosures = 1024

func newClosureQueuer(capacity int, queue func(ctx context.Context, drv string)) *closureQueuer {
	return &closureQueuer{pending: make(chan string, capacity), queue: queue}
}

// add hands drv over without waiting; false if too many wait already.
func (q *closureQueuer) add(drv string) bool {
	select {
	case q.pending <- drv:
		return true
	default:
		return false
	}
}

// run queues what is handed over until ctx ends.
func (q *closureQueuer) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case drv := <-q.pending:
			q.queue(ctx, drv)
		}
	}
}

// queueBuildClosure queues the build closure of the derivation a hook
// handed over (--build-closures).
func (a *Agent) queueBuildClosure(ctx context.Context, drv string) {
	paths, skipped, err := a.buildClosure(ctx, storePaths{drv})
	if err == nil && len(paths) > 0 {
		_, err = a.intake.request(ctx, intake{paths: paths, source: queue.SourceBuildClosure})
	}
	if err != nil {
		a.log.Warn("queue build closure", "drv", drv, "err", err)
		return
	}
	a.metrics.Queued(queue.SourceBuildClosure.String(), len(paths))
	a.log.Info("build closure queued", "drv", drv, "paths", len(paths), "skipped", len(skipped))
}
