package realisation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/drvhash"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/storepath"
)

// Store is what the Realiser asks the Nix daemon (nixstore.Store).
type Store interface {
	QueryDerivationOutputMap(ctx context.Context, drv string) (map[string]string, error)
	QueryRealisation(ctx context.Context, id string) (*nixstore.Realisation, error)
	QueryPathInfo(ctx context.Context, p string) (*nixstore.PathInfo, error)
	QueryReferrers(ctx context.Context, p string) ([]string, error)
	QueryBuildTrace(ctx context.Context, drv, output string) (*nixstore.BuildTraceEntry, error)
}

// Options configure a Realiser.
type Options struct {
	Store    Store
	Keys     []signature.SecretKey
	StoreDir string // default /nix/store
	Logger   *slog.Logger
	// ReadDrv reads a .drv (os.ReadFile if nil).
	ReadDrv func(path string) ([]byte, error)
}

// Realiser finds and renders the realisations of store paths; it
// implements uploader.Realiser. It is safe for concurrent use.
type Realiser struct {
	opt    Options
	hasher *drvhash.Hasher
	log    *slog.Logger

	mu     sync.Mutex
	notes  map[string]map[string]time.Time // store path → derivations that produced it → when noted
	static map[string]bool                 // drv path → every output path is in the .drv
	// quietUntil: the daemon refused realisation queries; not asked
	// again (and not logged again) before then.
	quietUntil time.Time
	// fullUntil: the notes were full; not logged again before then.
	fullUntil time.Time
}

// Bounds of the in-memory state.
const (
	maxNotes    = 10_000
	noteTTL     = time.Hour
	maxStatic   = 100_000
	quietPeriod = 10 * time.Minute
)

// New returns a Realiser.
func New(opt Options) *Realiser {
	if opt.StoreDir == "" {
		opt.StoreDir = storepath.DefaultStoreDir
	}
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	return &Realiser{
		opt:    opt,
		hasher: &drvhash.Hasher{Read: opt.ReadDrv},
		log:    opt.Logger,
		notes:  map[string]map[string]time.Time{},
		static: map[string]bool{},
	}
}

// Note records that drv produced paths (the post-build hook says so). For
// a resolved build this is the only link between the output and the
// derivation clients know (the output's deriver is the resolved one).
// Notes live in memory until Forget, at most an hour.
func (r *Realiser) Note(drv string, paths ...string) {
	if drv == "" || storepath.Check(r.opt.StoreDir, drv) != nil {
		return
	}
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.notes) >= maxNotes {
		for p, ds := range r.notes {
			for d, at := range ds {
				if now.Sub(at) > noteTTL {
					delete(ds, d)
				}
			}
			if len(ds) == 0 {
				delete(r.notes, p)
			}
		}
		if len(r.notes) >= maxNotes {
			if now.After(r.fullUntil) {
				r.fullUntil = now.Add(quietPeriod)
				r.log.Warn("too many build outputs waiting for upload: the derivation that produced these is not remembered, so a resolved content-addressed build may get no realisation", "drv", drv, "outputs", len(paths), "limit", maxNotes)
			}
			return
		}
	}
	for _, p := range paths {
		ds := r.notes[p]
		if ds == nil {
			ds = map[string]time.Time{}
			r.notes[p] = ds
		}
		ds[drv] = now
	}
}

// Noted returns the derivations noted for path.
func (r *Realiser) Noted(path string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.notes[path]))
	for d := range r.notes[path] {
		out = append(out, d)
	}
	sort.Strings(out)
	return out
}

// Forget removes the notes drvs of path (their realisations are written)
// and returns the derivations noted for path since.
func (r *Realiser) Forget(path string, drvs []string) (since []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ds := r.notes[path]
	for _, d := range drvs {
		delete(ds, d)
	}
	for d := range ds {
		since = append(since, d)
	}
	if len(ds) == 0 {
		delete(r.notes, path)
	}
	sort.Strings(since)
	return since
}

// found is one realisation with what is known of its derivation.
type found struct {
	real   *nixstore.Realisation
	drv    string // derivation path; "" when reached as a dependency (known by id only)
	output string
	// resolved: the derivation has no input derivations (what Nix 2.35
	// records build trace entries for).
	resolved bool
	// byPath: the daemon keys realisations by derivation path (Nix 2.35
	// and later); real was made from its build trace entry, whose
	// signatures are traceSigs.
	byPath    bool
	traceSigs []string
}

// For returns the realisation objects to write for info.Path, whose
// narinfo is in the cache: dependencies first, then the realisations of
// the derivation outputs info.Path realises.
func (r *Realiser) For(ctx context.Context, info *nixstore.PathInfo) ([]cachefmt.Object, error) {
	roots, err := r.roots(ctx, info)
	if err != nil || len(roots) == 0 {
		return nil, err
	}
	cache := map[string]*nixstore.Realisation{}
	var order []found
	seen := map[string]bool{}
	for _, root := range roots {
		deps, err := r.closure(ctx, info, root.real, cache)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			var bad *badClosureError
			if errors.As(err, &bad) {
				r.log.Warn("realisation left out", "path", info.Path, "drv", root.drv, "id", root.real.ID, "err", err)
				continue
			}
			return nil, err
		}
		for _, d := range deps {
			if !seen[d.ID] {
				seen[d.ID] = true
				order = append(order, found{real: d})
			}
		}
		if !seen[root.real.ID] {
			seen[root.real.ID] = true
			order = append(order, root)
		} else if root.drv != "" {
			// Known as a dependency of an earlier root, and by path too.
			order = append(order, found{real: root.real, drv: root.drv, output: root.output, resolved: root.resolved})
		}
	}
	var extras []cachefmt.Object
	written := map[string]bool{}
	for _, f := range order {
		real := *f.real
		real.Signatures = slices.Clone(real.Signatures)
		if err := Sign(&real, r.opt.Keys); err != nil {
			return nil, err
		}
		if k := Key(real.ID); !written[k] && (!f.byPath || f.resolved) {
			// From a build trace entry only a derivation without input
			// derivations has a hash-keyed realisation to write: it
			// depends on no other (entries record no dependencies).
			written[k] = true
			extras = append(extras, cachefmt.Object{Key: k, ContentType: ContentType, Body: Document(&real)})
		}
		if f.drv != "" && (f.resolved || f.byPath) {
			drvBase := filepath.Base(f.drv)
			body, err := BuildTraceDocument(drvBase, f.output, real.OutPath, r.opt.Keys, f.traceSigs)
			if err != nil {
				return nil, err
			}
			if k := BuildTraceKey(drvBase, f.output); !written[k] {
				written[k] = true
				extras = append(extras, cachefmt.Object{Key: k, ContentType: ContentType, Body: body})
			}
		}
	}
	return extras, nil
}

// roots finds the realisations whose output is info.Path, among the
// derivations known to have produced it and, when those are all resolved
// derivations (what Nix 2.33 and later name in the hook), the unresolved
// derivations found by searchUnresolved.
func (r *Realiser) roots(ctx context.Context, info *nixstore.PathInfo) ([]found, error) {
	candidates := r.Noted(info.Path)
	if info.Deriver != "" && !slices.Contains(candidates, info.Deriver) {
		candidates = append(candidates, info.Deriver)
	}
	var roots []found
	for _, drvPath := range candidates {
		fs, stop, err := r.rootsOf(ctx, info, drvPath)
		if stop || err != nil {
			return nil, err
		}
		roots = append(roots, fs...)
	}
	unresolvedKnown := false
	var resolved []string
	for _, f := range roots {
		if f.byPath {
			// Nix 2.35 and later record entries for resolved derivations
			// (and for the ones a client substituted): nothing to search.
			return roots, nil
		}
		if f.resolved {
			resolved = append(resolved, f.drv)
		} else {
			unresolvedKnown = true
		}
	}
	if unresolvedKnown {
		return roots, nil
	}
	for _, drvPath := range resolved {
		found, err := r.searchUnresolved(ctx, info, drvPath, candidates)
		if err != nil {
			return nil, err
		}
		roots = append(roots, found...)
	}
	return roots, nil
}

// rootsOf returns the realisations of drvPath's outputs that are
// info.Path. stop: the daemon answers no realisation queries.
func (r *Realiser) rootsOf(ctx context.Context, info *nixstore.PathInfo, drvPath string) (roots []found, stop bool, err error) {
	if storepath.Check(r.opt.StoreDir, drvPath) != nil || r.isStatic(drvPath) {
		return nil, false, nil
	}
	d, err := r.hasher.Load(drvPath)
	if err != nil {
		// Typically the deriver is not in this store (the path was
		// substituted, or the .drv collected): nothing to publish.
		r.log.Debug("derivation unreadable; no realisation", "path", info.Path, "drv", drvPath, "err", err)
		r.setStatic(drvPath)
		return nil, false, nil
	}
	if d.StaticOutputs() {
		r.setStatic(drvPath)
		return nil, false, nil
	}
	if r.quiet() {
		return nil, true, nil
	}
	outs, err := r.opt.Store.QueryDerivationOutputMap(ctx, drvPath)
	if err != nil {
		var de *nixstore.DaemonError
		if errors.As(err, &de) {
			r.log.Warn("derivation outputs unknown to the Nix daemon; no realisation", "path", info.Path, "drv", drvPath, "err", err)
			return nil, false, nil
		}
		return nil, false, err
	}
	base := filepath.Base(info.Path)
	for _, o := range d.Outputs {
		if outs[o.Name] != info.Path {
			// Not this output, or the daemon knows no realisation
			// (ca-derivations off there: never ask it for one then).
			continue
		}
		id, err := r.hasher.ID(d, o.Name)
		if err != nil {
			r.log.Warn("cannot compute the realisation id", "path", info.Path, "drv", drvPath, "output", o.Name, "err", err)
			continue
		}
		real, err := r.opt.Store.QueryRealisation(ctx, id)
		if errors.Is(err, nixstore.ErrKeyedByPath) {
			f, stop, err := r.fromBuildTrace(ctx, info, d, drvPath, o.Name, id)
			if stop || err != nil {
				return nil, stop, err
			}
			if f != nil {
				roots = append(roots, *f)
			}
			continue
		}
		if errors.Is(err, nixstore.ErrRealisationsUnsupported) {
			r.setQuiet(err)
			return nil, true, nil
		}
		if err != nil {
			return nil, false, err
		}
		if real == nil || real.OutPath != base {
			r.log.Warn("the Nix daemon has no matching realisation", "path", info.Path, "drv", drvPath, "id", id)
			continue
		}
		roots = append(roots, found{real: real, drv: drvPath, output: o.Name, resolved: len(d.InputDrvs) == 0})
	}
	return roots, false, nil
}

// fromBuildTrace reads the build trace entry of drvPath's output from a
// daemon that keys realisations by derivation path.
func (r *Realiser) fromBuildTrace(ctx context.Context, info *nixstore.PathInfo, d *drvhash.Derivation, drvPath, output, id string) (*found, bool, error) {
	e, err := r.opt.Store.QueryBuildTrace(ctx, drvPath, output)
	if errors.Is(err, nixstore.ErrRealisationsUnsupported) {
		r.setQuiet(err)
		return nil, true, nil
	}
	if err != nil {
		return nil, false, err
	}
	if e == nil || e.OutPath != filepath.Base(info.Path) {
		r.log.Warn("the Nix daemon has no matching build trace entry", "path", info.Path, "drv", drvPath, "output", output)
		return nil, false, nil
	}
	return &found{
		real:      &nixstore.Realisation{ID: id, OutPath: e.OutPath, DependentRealisations: map[string]string{}},
		drv:       drvPath,
		output:    output,
		resolved:  len(d.InputDrvs) == 0,
		byPath:    true,
		traceSigs: e.Signatures,
	}, false, nil
}

// maxReferrerQueries bounds the daemon queries of one search for the
// unresolved derivations of a resolved one.
const maxReferrerQueries = 32

// searchUnresolved finds the unresolved derivations whose realisation in
// the store is info.Path, given the resolved derivation resolvedDrv that
// built it. Nix 2.33 and later run the post-build hook for the resolved
// derivation only, and the store links neither the output nor the
// resolved derivation to the unresolved one: its realisation is keyed by
// its hash, and floating outputs have no row in the derivation outputs
// table (so QueryValidDerivers cannot name it either).
//
// An unresolved derivation U refers to the inputs resolution replaced
// (its input derivations) and keeps its input sources; the resolved one
// lists the inputs' outputs and U's sources as its sources, under U's
// name. So for each source Q of resolvedDrv (in order) the candidates are
// the derivations of that name with input derivations that refer to Q or
// to Q's deriver. A candidate counts only if the daemon's own output map
// for it names info.Path (its registered realisation says so), which makes
// the search sound however the candidates were found; it stops at the
// first source that yields one. It misses U when U refers to none of
// these: an input whose output came from a resolved build (its deriver is
// that resolved derivation, not the one U refers to) and no input source
// of U's own.
func (r *Realiser) searchUnresolved(ctx context.Context, info *nixstore.PathInfo, resolvedDrv string, known []string) ([]found, error) {
	d, err := r.hasher.Load(resolvedDrv)
	if err != nil || len(d.InputSrcs) == 0 {
		return nil, nil
	}
	name := storepath.Name(resolvedDrv)
	queries := 0
	tried := map[string]bool{resolvedDrv: true}
	for _, k := range known {
		tried[k] = true
	}
	for _, src := range d.InputSrcs {
		targets := []string{src}
		if queries < maxReferrerQueries {
			queries++
			pi, err := r.opt.Store.QueryPathInfo(ctx, src)
			if err != nil {
				return nil, err
			}
			if pi != nil && pi.Deriver != "" && pi.Deriver != resolvedDrv {
				targets = append(targets, pi.Deriver)
			}
		}
		var roots []found
		for _, t := range targets {
			if queries >= maxReferrerQueries {
				r.log.Debug("search for the unresolved derivation stopped", "path", info.Path, "drv", resolvedDrv, "queries", queries)
				return nil, nil
			}
			queries++
			refs, err := r.opt.Store.QueryReferrers(ctx, t)
			if err != nil {
				var de *nixstore.DaemonError
				if errors.As(err, &de) {
					continue // t is not valid (a deriver collected)
				}
				return nil, err
			}
			for _, u := range refs {
				if tried[u] || !strings.HasSuffix(u, ".drv") || storepath.Name(u) != name {
					continue
				}
				tried[u] = true
				ud, err := r.hasher.Load(u)
				if err != nil || len(ud.InputDrvs) == 0 {
					continue
				}
				fs, stop, err := r.rootsOf(ctx, info, u)
				if stop || err != nil {
					return nil, err
				}
				roots = append(roots, fs...)
			}
		}
		if len(roots) > 0 {
			return roots, nil
		}
	}
	return nil, nil
}

// badClosureError is a realisation whose dependencies cannot be written
// in closure order.
type badClosureError struct{ msg string }

func (e *badClosureError) Error() string { return e.msg }

// closure returns the realisations root depends on, recursively, each
// after its own dependencies. Every dependency's output must be a
// reference of the output that depends on it.
func (r *Realiser) closure(ctx context.Context, info *nixstore.PathInfo, root *nixstore.Realisation, cache map[string]*nixstore.Realisation) ([]*nixstore.Realisation, error) {
	var out []*nixstore.Realisation
	done := map[string]bool{}
	onStack := map[string]bool{}
	var visit func(real *nixstore.Realisation) error
	visit = func(real *nixstore.Realisation) error {
		if len(real.DependentRealisations) == 0 {
			return nil
		}
		refs, err := r.references(ctx, info, real.OutPath)
		if err != nil {
			return err
		}
		ids := make([]string, 0, len(real.DependentRealisations))
		for id := range real.DependentRealisations {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		for _, id := range ids {
			depOut := real.DependentRealisations[id]
			if id == real.ID || done[id] {
				continue
			}
			if onStack[id] {
				return &badClosureError{fmt.Sprintf("realisation %s depends on itself", id)}
			}
			if !refs[depOut] {
				return &badClosureError{fmt.Sprintf("dependency %s (%s) is not a reference of %s", id, depOut, real.OutPath)}
			}
			dep := cache[id]
			if dep == nil {
				dep, err = r.opt.Store.QueryRealisation(ctx, id)
				if err != nil {
					return err
				}
				if dep == nil {
					return &badClosureError{fmt.Sprintf("dependency %s is not in the store", id)}
				}
				cache[id] = dep
			}
			if dep.OutPath != depOut {
				return &badClosureError{fmt.Sprintf("dependency %s is realised by %s, not %s", id, dep.OutPath, depOut)}
			}
			onStack[id] = true
			if err := visit(dep); err != nil {
				return err
			}
			onStack[id] = false
			done[id] = true
			out = append(out, dep)
		}
		return nil
	}
	onStack[root.ID] = true
	return out, visit(root)
}

// references returns the references (base names) of the store path with
// base name base.
func (r *Realiser) references(ctx context.Context, info *nixstore.PathInfo, base string) (map[string]bool, error) {
	refs := info.References
	if base != filepath.Base(info.Path) {
		pi, err := r.opt.Store.QueryPathInfo(ctx, filepath.Join(r.opt.StoreDir, base))
		if err != nil {
			return nil, err
		}
		if pi == nil {
			return nil, &badClosureError{fmt.Sprintf("%s is not valid in the store", base)}
		}
		refs = pi.References
	}
	m := make(map[string]bool, len(refs))
	for _, p := range refs {
		m[filepath.Base(p)] = true
	}
	return m, nil
}

func (r *Realiser) isStatic(drv string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.static[drv]
}

func (r *Realiser) setStatic(drv string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.static) >= maxStatic {
		clear(r.static)
	}
	r.static[drv] = true
}

func (r *Realiser) quiet() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return time.Now().Before(r.quietUntil)
}

func (r *Realiser) setQuiet(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.quietUntil = time.Now().Add(quietPeriod)
	r.log.Warn("no realisations uploaded: the Nix daemon does not answer realisation queries (ca-derivations off, or a Nix whose protocol this agentd does not speak); asking again in 10 minutes", "err", err)
}

// Wants reports whether a derivation noted for path may have a
// realisation to publish (its outputs are not all written in the .drv),
// reading the .drv if need be. It asks the daemon nothing.
func (r *Realiser) Wants(path string) bool {
	for _, drv := range r.Noted(path) {
		if r.Floating(drv) {
			return true
		}
	}
	return false
}

// Floating reports whether drv may have a realisation to publish: it is
// readable and not every output path is written in it. It asks the daemon
// nothing.
func (r *Realiser) Floating(drv string) bool {
	if storepath.Check(r.opt.StoreDir, drv) != nil || r.isStatic(drv) {
		return false
	}
	d, err := r.hasher.Load(drv)
	if err != nil || d.StaticOutputs() {
		r.setStatic(drv)
		return false
	}
	return true
}
