package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/realisation"
)

// admit is the one way into the queue. Socket requests (the hook's and
// agentctl push's), spool files, the store watcher, build closures and
// late realisations all go through it, in the same order: the paths
// (parsed already where they entered) get the realised floating outputs
// of their derivation, are checked valid with the Nix daemon, are noted
// for their derivation's realisations, and are rooted against garbage
// collection and committed to the queue together.
//
// Requests are all or nothing (request); a spool file keeps what it can
// (spooled); captured paths are Nix's own and need only still be valid
// (captured).
type admit struct {
	storeDir string
	// store answers the checks of paths (connections of their own, so
	// that a hook never waits behind the uploads' metadata queries).
	store    requestStore
	realiser *realisation.Realiser
	roots    *rootKeeper
	queue    *queue.Queue
	stateErr *stateError
	now      func() time.Time
	log      *slog.Logger
	// prefetch, if set, learns in bulk which of many paths the cache
	// holds, before their jobs run.
	prefetch func(paths []string)
}

// intake is what is to be queued.
type intake struct {
	paths    storePaths
	drv      drvPath
	floating bool // add drv's realised floating content-addressed outputs
	source   queue.Source
}

// request queues in for a client, all or nothing: a path that is not
// valid in the store refuses the request.
func (ad *admit) request(ctx context.Context, in intake) ([]queue.EnqueueResult, error) {
	paths := in.paths
	if in.floating {
		if in.drv == "" {
			return nil, &RefusedError{errors.New("floating outputs requested without a derivation")}
		}
		outs, err := ad.floatingOutputs(ctx, in.drv)
		if err != nil {
			return nil, err
		}
		more, err := parsePaths(ad.storeDir, outs)
		if err != nil {
			return nil, err
		}
		if paths = paths.union(more); len(paths) == 0 {
			return nil, &RefusedError{fmt.Errorf("derivation %s has no realised outputs", in.drv)}
		}
	}
	if len(paths) > maxRequestPaths {
		return nil, tooMany(len(paths))
	}
	// Before the commit: a job that finishes meanwhile sees the note
	// (see realiseLate).
	ad.realiser.Note(string(in.drv), paths...)
	if len(paths) > prefetchAbove && ad.prefetch != nil {
		// Many paths at once (push --closure): learn which the cache
		// holds with a few listings, starting before the jobs do, so
		// that they need not ask one by one.
		ad.prefetch(paths)
	}
	valid, invalid, err := ad.valid(ctx, paths)
	if err != nil {
		return nil, err
	}
	if len(invalid) > 0 {
		return nil, &RefusedError{fmt.Errorf("%s is not a valid path in the Nix store", invalid[0])}
	}
	return ad.commit(valid, in.drv, queue.EnqueueOptions{Source: in.source}, true)
}

// spooled queues what spool file f asks for, as far as it can: paths that
// are not store paths or not valid in the store are logged and left out,
// a derivation that is not a store path is dropped. It fails only when the
// Nix daemon or the queue does (the file is then tried again), and
// returns how many paths it queued.
func (ad *admit) spooled(ctx context.Context, f string, rawPaths []string, rawDrv string, floating bool) (int, error) {
	paths, bad := sortPaths(ad.storeDir, rawPaths)
	drv, derr := parseDrv(ad.storeDir, rawDrv)
	if floating && rawDrv != "" {
		if derr != nil {
			ad.log.Warn("spooled derivation refused", "file", f, "drv", rawDrv, "err", derr)
		} else if outs, err := ad.floatingOutputs(ctx, drv); err != nil {
			var refused *RefusedError
			if !errors.As(err, &refused) {
				return 0, fmt.Errorf("outputs of %s: %w", drv, err)
			}
			ad.log.Warn("spooled derivation refused", "file", f, "drv", drv, "err", err)
		} else {
			more, moreBad := sortPaths(ad.storeDir, outs)
			paths = paths.union(more)
			if bad == nil {
				bad = moreBad
			}
			for p, err := range moreBad {
				bad[p] = err
			}
		}
	}
	for p, err := range bad {
		ad.log.Warn("spooled path refused", "file", f, "path", p, "err", err)
	}
	if len(paths) == 0 {
		return 0, nil
	}
	valid, invalid, err := ad.valid(ctx, paths)
	if err != nil {
		return 0, fmt.Errorf("check the paths of %s: %w", f, err)
	}
	for _, p := range invalid {
		ad.log.Warn("spooled path refused", "file", f, "path", p, "err", "not a valid path in the Nix store")
	}
	if len(valid) == 0 {
		return 0, nil
	}
	ad.realiser.Note(string(drv), valid...)
	if _, err := ad.commit(valid, drv, queue.EnqueueOptions{Source: queue.SourceHook}, false); err != nil {
		return 0, err
	}
	return len(valid), nil
}

// captured queues the paths the store watcher read from Nix's database
// (store paths by construction) that are still valid, with the watcher's
// cursor in the same commit. It returns how many it queued and the
// queue's answers.
func (ad *admit) captured(ctx context.Context, paths []string, mark *queue.Mark) ([]queue.EnqueueResult, int, error) {
	var valid storePaths
	if len(paths) > 0 {
		// A path collected since Nix registered it is no longer to be had.
		var err error
		if valid, _, err = ad.valid(ctx, storePaths(paths)); err != nil {
			return nil, 0, fmt.Errorf("check captured paths with the Nix daemon: %w", err)
		}
	}
	if len(valid) == 0 {
		if err := ad.queue.SetMark(mark.Name, mark.Value); err != nil {
			return nil, 0, fmt.Errorf("store watcher cursor: %w", err)
		}
		return nil, 0, nil
	}
	res, err := ad.commit(valid, "", queue.EnqueueOptions{Source: queue.SourceCapture, Mark: mark}, true)
	if err != nil {
		return nil, 0, fmt.Errorf("queue captured paths: %w", err)
	}
	return res, len(valid), nil
}

// checkValid refuses paths unless every one is valid in the store.
func (ad *admit) checkValid(ctx context.Context, paths storePaths) error {
	_, invalid, err := ad.valid(ctx, paths)
	if err != nil {
		return err
	}
	if len(invalid) > 0 {
		return &RefusedError{fmt.Errorf("%s is not a valid path in the Nix store", invalid[0])}
	}
	return nil
}

// valid splits paths into those valid in the store and the others, asking
// the Nix daemon once.
func (ad *admit) valid(ctx context.Context, paths storePaths) (valid, invalid storePaths, err error) {
	answer, err := ad.store.QueryValidPaths(ctx, paths)
	if err != nil {
		return nil, nil, err
	}
	ok := make(map[string]bool, len(answer))
	for _, v := range answer {
		ok[v] = true
	}
	for _, p := range paths {
		if ok[p] {
			valid = append(valid, p)
		} else {
			invalid = append(invalid, p)
		}
	}
	return valid, invalid, nil
}

// floatingOutputs returns the realised outputs of drv, which include the
// floating content-addressed ones (they have no path in the .drv).
func (ad *admit) floatingOutputs(ctx context.Context, drv drvPath) ([]string, error) {
	outs, err := ad.store.QueryDerivationOutputMap(ctx, string(drv))
	if err != nil {
		return nil, err
	}
	var paths []string
	for _, p := range outs {
		if p != "" {
			paths = append(paths, p)
		}
	}
	return paths, nil
}

// commit roots paths and commits their jobs. It returns only after the
// commit and the roots are durable. The roots are made while the queue
// commits: each costs an fsync, and done one after the other they nearly
// doubled the time a hook waits (a root that a crash loses before the
// commit is durable is made again at the next start, for every queued
// path). Unless rootsRequired, a root that cannot be made is logged and
// the jobs are queued all the same.
func (ad *admit) commit(paths storePaths, drv drvPath, opt queue.EnqueueOptions, rootsRequired bool) ([]queue.EnqueueResult, error) {
	var res []queue.EnqueueResult
	var err error
	rerr := ad.roots.whileRooted(paths, string(drv), func() error {
		res, err = ad.queue.EnqueueWith(paths, string(drv), ad.now(), opt)
		return err
	})
	if err == nil && rerr != nil {
		if !rootsRequired {
			ad.log.Warn("gc root", "err", rerr)
		} else {
			err = fmt.Errorf("queued, but not protected from garbage collection: %w", rerr)
		}
	}
	ad.stateErr.set(err)
	if err != nil {
		return nil, err
	}
	for _, r := range res {
		if r.Requeued {
			ad.log.Info("failed job queued again by a new request", "job", r.Job.ID, "path", r.Job.Path, "last_error", r.Job.LastError)
		}
	}
	return res, nil
}
