package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/queue"
	"github.com/nixspool/nixspool/internal/statedir"
	"github.com/nixspool/nixspool/internal/uploader"
	"github.com/nixspool/nixspool/protocol"
)

// doctor runs agentd's self-checks. It holds what the checks look at and
// nothing else; doctorOf builds one from the running agent.
type doctor struct {
	cfg      Config
	cache    *cacheurl.Cache
	bucket   bucket.Bucket
	store    *nixstore.Store
	queue    *queue.Queue
	roots    *rootKeeper
	filter   *filter
	access   access
	uploader *uploader.Uploader
	gc       *gcAgent
	// setReachable records a probe that reached the bucket.
	setReachable func(bool)
}

func (a *Agent) doctorOf() *doctor {
	return &doctor{
		cfg: a.cfg, cache: a.cache, bucket: a.bucket, store: a.store, queue: a.queue,
		roots: a.roots, filter: a.filter, access: a.access, uploader: a.uploader, gc: a.gc,
		setReachable: a.setReachable,
	}
}

// addCheck records one check's result.
type addCheck func(name, status, detail, hint string)

// doctor checks what agentd depends on, each with a hint when it fails.
// Only for an operator (writes) does it probe writes: a probe object put
// and deleted in the cache (and the collector's store checks, which write
// under nixspool/gc/), a GC root made and removed, a file in the state
// directory; anyone else who may connect gets the checks that only read.
func (d *doctor) run(ctx context.Context, writes bool) []protocol.Check {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var checks []protocol.Check
	add := func(name, status, detail, hint string) {
		checks = append(checks, protocol.Check{Name: name, Status: status, Detail: detail, Hint: hint})
	}
	d.checkConfig(add, writes)
	d.checkKeys(add)
	d.checkStore(ctx, add)
	d.checkStateDir(add, writes)
	d.checkRoots(add, writes)
	d.checkCredentials(ctx, add)
	d.checkBucket(ctx, add, writes)
	d.checkPresence(add)
	d.checkFilters(add)
	d.checkQueue(add)
	return checks
}

// checkConfig reports the configuration, who may do what, and cache URL
// parameters that do nothing here.
func (d *doctor) checkConfig(add addCheck, writes bool) {
	add("configuration", "ok", fmt.Sprintf("cache %s, %d jobs, state in %s", d.cache.String(), d.cfg.Jobs, d.cfg.StateDir), "")

	add("access", "ok", d.access.describe(), "")
	if !writes {
		add("write probes", "ok", "not run: only "+d.access.who(tierOperate)+" make doctor write and delete a probe object in the cache, a GC root and a file in the state directory; the checks below only read", "")
	}

	if len(d.cache.NoEffect) > 0 {
		add("cache URL parameters", "warn", "no effect here: "+strings.Join(d.cache.NoEffect, ", "),
			"accepted because Nix knows them; docs/configuration.md, \"Cache URL parameters\", says why each does nothing here")
	}
}

func (d *doctor) checkKeys(add addCheck) {
	keys, err := uploader.LoadSecretKeys(d.cfg.SecretKeyFiles, d.cfg.AllowInsecureKeyPerms)
	if err != nil {
		add("signing keys", "fail", err.Error(), "fix the key file, then restart agentd")
		return
	}
	var pubs []string
	for _, k := range keys {
		pubs = append(pubs, k.ToPublicKey().String())
	}
	add("signing keys", "ok", "trusted-public-keys = "+strings.Join(pubs, " "), "")
}

func (d *doctor) checkStore(ctx context.Context, add addCheck) {
	if _, err := d.store.QueryValidPaths(ctx, nil); err != nil {
		add("nix store", "fail", err.Error(), "agentd reads path metadata from the Nix daemon (--nix-daemon-socket) or `nix-daemon --stdio`; is Nix installed and the daemon running?")
	} else {
		add("nix store", "ok", "via "+d.store.String(), "")
	}
}

// checkStateDir writes a probe file (writes) and reports the free space.
func (d *doctor) checkStateDir(add addCheck, writes bool) {
	probe := filepath.Join(d.cfg.StateDir, ".doctor-probe")
	var werr error
	if writes {
		if werr = os.WriteFile(probe, []byte("x"), 0o600); werr == nil {
			os.Remove(probe)
		}
	}
	if werr != nil {
		add("state directory", "fail", werr.Error(), "agentd must be able to write "+d.cfg.StateDir+" (queue, spool, temp files)")
		return
	}
	var st syscall.Statfs_t
	if syscall.Statfs(d.cfg.StateDir, &st) == nil {
		free := st.Bavail * uint64(st.Bsize)
		if free < 1<<30 {
			add("state directory", "warn", fmt.Sprintf("%s: only %d MiB free", d.cfg.StateDir, free>>20), "large NARs are compressed into "+statedir.Dir(d.cfg.StateDir).Temp()+" before upload")
		} else {
			add("state directory", "ok", fmt.Sprintf("%s: %d GiB free", d.cfg.StateDir, free>>30), "")
		}
	}
}

// checkRoots makes and removes a GC root (writes).
func (d *doctor) checkRoots(add addCheck, writes bool) {
	if d.roots.dir.Enabled() && !writes {
		add("gc roots", "ok", d.roots.dir.Dir()+" (making a root not probed)", "")
	} else if d.roots.dir.Enabled() {
		if err := d.roots.dir.Add(filepath.Join(d.cfg.StoreDir, "00000000000000000000000000000000-nixspool-doctor")); err != nil {
			add("gc roots", "fail", err.Error(), "agentd keeps queued paths alive with roots in "+d.roots.dir.Dir())
		} else {
			d.roots.dir.Remove(filepath.Join(d.cfg.StoreDir, "00000000000000000000000000000000-nixspool-doctor"))
			add("gc roots", "ok", d.roots.dir.Dir(), "")
		}
	} else {
		add("gc roots", "warn", "off", "queued paths can be garbage-collected before they are uploaded")
	}
}

// checkCredentials says where the bucket's credentials come from, if it
// has any.
func (d *doctor) checkCredentials(ctx context.Context, add addCheck) {
	c, ok := d.bucket.(interface{ CredentialSource(context.Context) string })
	if !ok {
		return
	}
	switch src := c.CredentialSource(ctx); {
	case strings.HasPrefix(src, "none"):
		add("credentials", "warn", src, "requests are unsigned: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile (profile=, AWS_PROFILE), web identity or a container or instance role; docs/configuration.md, \"S3 credentials\", lists the order")
	case strings.HasPrefix(src, "error"):
		add("credentials", "fail", src, "")
	default:
		add("credentials", "ok", src, "")
	}
}

// checkPresence reports the presence cache and whether compression is
// deterministic.
func (d *doctor) checkPresence(add addCheck) {
	us := d.uploader.Stats()
	if us.Generation != "" {
		gen := us.Generation // "ETag@time": the nix-cache-info this generation began with
		if _, at, ok := strings.Cut(gen, "@"); ok {
			gen = "nix-cache-info of " + at
		}
		add("presence cache", "ok", fmt.Sprintf("%d paths known to be in the cache (%s, confirmed %s ago); narinfo writes are create-only (store honours If-None-Match: %s); `agentctl forget` clears it",
			us.KnownPresent, gen, us.GenerationAge.Round(time.Second), us.ConditionalWrites),
			"")
	}

	switch us.DeterministicCompression {
	case "yes":
		add("compression", "ok", fmt.Sprintf("%s gives the same bytes for the same NAR (checked at start): a NAR put back after a cache reset matches the narinfo written across it", d.cache.Compression), "")
	case "no":
		add("compression", "warn", fmt.Sprintf("%s does not give the same bytes for the same NAR here", d.cache.Compression),
			"a narinfo written while the bucket was being emptied may keep naming a NAR key that is not put back; `agentd audit` names such narinfos")
	}
}

// checkFilters reports what the filters keep out of the cache.
func (d *doctor) checkFilters(add addCheck) {
	if !d.filter.active() {
		return
	}
	st, _ := d.queue.Stats()
	if len(d.filter.signers) > 0 {
		add("filters", "warn", fmt.Sprintf("paths signed by %s are never uploaded, as dependencies neither (%d paths skipped so far)", strings.Join(d.cfg.SkipSignedBy, ", "), st.Skipped),
			"narinfos in this cache may name such paths as references: closures here are complete only for clients that also substitute from the cache that signed them (e.g. cache.nixos.org). Use --skip-signed-by= for a self-contained cache; `agentd audit --upstream URL` checks completeness with the upstream")
	}
	var what []string
	if len(d.filter.excludes) > 0 {
		what = append(what, "names matching "+strings.Join(d.cfg.Excludes, ", "))
	}
	if d.filter.maxSize > 0 {
		what = append(what, fmt.Sprintf("NARs over %d bytes", d.filter.maxSize))
	}
	if len(what) > 0 {
		add("exclusions", "ok", "not uploading paths handed over with "+strings.Join(what, "; ")+
			"; an excluded path that an uploaded path references is uploaded anyway, so that no narinfo names a reference the cache lacks", "")
	}
}

func (d *doctor) checkQueue(add addCheck) {
	if st, err := d.queue.Stats(); err == nil && st.Failed > 0 {
		add("queue", "warn", fmt.Sprintf("%d failed job(s)", st.Failed), "agentctl list --state failed; then agentctl retry ID|--all or drop ID")
	} else if err == nil {
		add("queue", "ok", fmt.Sprintf("%d pending, %d retrying", st.Pending, st.Retrying), "")
	}
}
