package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nixspool/nixspool/internal/uploader"
	"github.com/nixspool/nixspool/protocol"
)

// addCheck records one check's result.
type addCheck func(name, status, detail, hint string)

// doctor checks what agentd depends on, each with a hint when it fails.
// Only for an operator (writes) does it probe writes: a probe object put
// and deleted in the cache (and the collector's store checks, which write
// under nixspool/gc/), a GC root made and removed, a file in the state
// directory; anyone else who may connect gets the checks that only read.
func (a *Agent) doctor(ctx context.Context, writes bool) []protocol.Check {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var checks []protocol.Check
	add := func(name, status, detail, hint string) {
		checks = append(checks, protocol.Check{Name: name, Status: status, Detail: detail, Hint: hint})
	}
	a.doctorConfig(add, writes)
	a.doctorKeys(add)
	a.doctorStore(ctx, add)
	a.doctorStateDir(add, writes)
	a.doctorRoots(add, writes)
	a.doctorCredentials(ctx, add)
	a.doctorBucket(ctx, add, writes)
	a.doctorPresence(add)
	a.doctorFilters(add)
	a.doctorQueue(add)
	return checks
}

// doctorConfig reports the configuration, who may do what, and cache URL
// parameters that do nothing here.
func (a *Agent) doctorConfig(add addCheck, writes bool) {
	add("configuration", "ok", fmt.Sprintf("cache %s, %d jobs, state in %s", a.cache.String(), a.cfg.Jobs, a.cfg.StateDir), "")

	add("access", "ok", a.access.describe(), "")
	if !writes {
		add("write probes", "ok", "not run: only "+a.access.who(tierOperate)+" make doctor write and delete a probe object in the cache, a GC root and a file in the state directory; the checks below only read", "")
	}

	if len(a.cache.NoEffect) > 0 {
		add("cache URL parameters", "warn", "no effect here: "+strings.Join(a.cache.NoEffect, ", "),
			"accepted because Nix knows them; docs/configuration.md, \"Cache URL parameters\", says why each does nothing here")
	}
}

func (a *Agent) doctorKeys(add addCheck) {
	keys, err := uploader.LoadSecretKeys(a.cfg.SecretKeyFiles, a.cfg.AllowInsecureKeyPerms)
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

func (a *Agent) doctorStore(ctx context.Context, add addCheck) {
	if _, err := a.store.QueryValidPaths(ctx, nil); err != nil {
		add("nix store", "fail", err.Error(), "agentd reads path metadata from the Nix daemon (--nix-daemon-socket) or `nix-daemon --stdio`; is Nix installed and the daemon running?")
	} else {
		add("nix store", "ok", "via "+a.store.String(), "")
	}
}

// doctorStateDir writes a probe file (writes) and reports the free space.
func (a *Agent) doctorStateDir(add addCheck, writes bool) {
	probe := filepath.Join(a.cfg.StateDir, ".doctor-probe")
	var werr error
	if writes {
		if werr = os.WriteFile(probe, []byte("x"), 0o600); werr == nil {
			os.Remove(probe)
		}
	}
	if werr != nil {
		add("state directory", "fail", werr.Error(), "agentd must be able to write "+a.cfg.StateDir+" (queue, spool, temp files)")
		return
	}
	var st syscall.Statfs_t
	if syscall.Statfs(a.cfg.StateDir, &st) == nil {
		free := st.Bavail * uint64(st.Bsize)
		if free < 1<<30 {
			add("state directory", "warn", fmt.Sprintf("%s: only %d MiB free", a.cfg.StateDir, free>>20), "large NARs are compressed into "+a.cfg.StateDir+"/tmp before upload")
		} else {
			add("state directory", "ok", fmt.Sprintf("%s: %d GiB free", a.cfg.StateDir, free>>30), "")
		}
	}
}

// doctorRoots makes and removes a GC root (writes).
func (a *Agent) doctorRoots(add addCheck, writes bool) {
	if a.roots.dir.Enabled() && !writes {
		add("gc roots", "ok", a.roots.dir.Dir()+" (making a root not probed)", "")
	} else if a.roots.dir.Enabled() {
		if err := a.roots.dir.Add(filepath.Join(a.cfg.StoreDir, "00000000000000000000000000000000-nixspool-doctor")); err != nil {
			add("gc roots", "fail", err.Error(), "agentd keeps queued paths alive with roots in "+a.roots.dir.Dir())
		} else {
			a.roots.dir.Remove(filepath.Join(a.cfg.StoreDir, "00000000000000000000000000000000-nixspool-doctor"))
			add("gc roots", "ok", a.roots.dir.Dir(), "")
		}
	} else {
		add("gc roots", "warn", "off", "queued paths can be garbage-collected before they are uploaded")
	}
}

// doctorCredentials says where the bucket's credentials come from, if it
// has any.
func (a *Agent) doctorCredentials(ctx context.Context, add addCheck) {
	c, ok := a.bucket.(interface{ CredentialSource(context.Context) string })
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

// doctorPresence reports the presence cache and whether compression is
// deterministic.
func (a *Agent) doctorPresence(add addCheck) {
	us := a.uploader.Stats()
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
		add("compression", "ok", fmt.Sprintf("%s gives the same bytes for the same NAR (checked at start): a NAR put back after a cache reset matches the narinfo written across it", a.cache.Compression), "")
	case "no":
		add("compression", "warn", fmt.Sprintf("%s does not give the same bytes for the same NAR here", a.cache.Compression),
			"a narinfo written while the bucket was being emptied may keep naming a NAR key that is not put back; `agentd audit` names such narinfos")
	}
}

// doctorFilters reports what the filters keep out of the cache.
func (a *Agent) doctorFilters(add addCheck) {
	if !a.filter.active() {
		return
	}
	st, _ := a.queue.Stats()
	if len(a.filter.signers) > 0 {
		add("filters", "warn", fmt.Sprintf("paths signed by %s are never uploaded, as dependencies neither (%d paths skipped so far)", strings.Join(a.cfg.SkipSignedBy, ", "), st.Skipped),
			"narinfos in this cache may name such paths as references: closures here are complete only for clients that also substitute from the cache that signed them (e.g. cache.nixos.org). Use --skip-signed-by= for a self-contained cache; `agentd audit --upstream URL` checks completeness with the upstream")
	}
	var what []string
	if len(a.filter.excludes) > 0 {
		what = append(what, "names matching "+strings.Join(a.cfg.Excludes, ", "))
	}
	if a.filter.maxSize > 0 {
		what = append(what, fmt.Sprintf("NARs over %d bytes", a.filter.maxSize))
	}
	if len(what) > 0 {
		add("exclusions", "ok", "not uploading paths handed over with "+strings.Join(what, "; ")+
			"; an excluded path that an uploaded path references is uploaded anyway, so that no narinfo names a reference the cache lacks", "")
	}
}

func (a *Agent) doctorQueue(add addCheck) {
	if st, err := a.queue.Stats(); err == nil && st.Failed > 0 {
		add("queue", "warn", fmt.Sprintf("%d failed job(s)", st.Failed), "agentctl list --state failed; then agentctl retry ID|--all or drop ID")
	} else if err == nil {
		add("queue", "ok", fmt.Sprintf("%d pending, %d retrying", st.Pending, st.Retrying), "")
	}
}
