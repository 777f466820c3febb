package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/gc"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storepath"
	"github.com/nixspool/nixspool/uploader"
)

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

	add("configuration", "ok", fmt.Sprintf("cache %s, %d jobs, state in %s", a.cache.String(), a.cfg.Jobs, a.cfg.StateDir), "")

	add("access", "ok", a.access.describe(), "")
	if !writes {
		add("write probes", "ok", "not run: only "+a.access.who(tierOperate)+" make doctor write and delete a probe object in the cache, a GC root and a file in the state directory; the checks below only read", "")
	}

	if len(a.cache.NoEffect) > 0 {
		add("cache URL parameters", "warn", "no effect here: "+strings.Join(a.cache.NoEffect, ", "),
			"accepted because Nix knows them; the README's table of cache URL parameters says why each does nothing here")
	}

	keys, err := uploader.LoadSecretKeys(a.cfg.SecretKeyFiles, a.cfg.AllowInsecureKeyPerms)
	if err != nil {
		add("signing keys", "fail", err.Error(), "fix the key file, then restart agentd")
	} else {
		var pubs []string
		for _, k := range keys {
			pubs = append(pubs, k.ToPublicKey().String())
		}
		add("signing keys", "ok", "trusted-public-keys = "+strings.Join(pubs, " "), "")
	}

	if _, err := a.store.QueryValidPaths(ctx, nil); err != nil {
		add("nix store", "fail", err.Error(), "agentd reads path metadata from the Nix daemon (--nix-daemon-socket) or `nix-daemon --stdio`; is Nix installed and the daemon running?")
	} else {
		add("nix store", "ok", "via "+a.store.String(), "")
	}

	probe := filepath.Join(a.cfg.StateDir, ".doctor-probe")
	var werr error
	if writes {
		if werr = os.WriteFile(probe, []byte("x"), 0o600); werr == nil {
			os.Remove(probe)
		}
	}
	if werr != nil {
		add("state directory", "fail", werr.Error(), "agentd must be able to write "+a.cfg.StateDir+" (queue, spool, temp files)")
	} else {
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

	if c, ok := a.bucket.(interface{ CredentialSource(context.Context) string }); ok {
		switch src := c.CredentialSource(ctx); {
		case strings.HasPrefix(src, "none"):
			add("credentials", "warn", src, "requests are unsigned: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile (profile=, AWS_PROFILE), web identity or a container or instance role; the README lists the order")
		case strings.HasPrefix(src, "error"):
			add("credentials", "fail", src, "")
		default:
			add("credentials", "ok", src, "")
		}
	}

	a.doctorBucket(ctx, add, writes)

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

	if a.filter.active() {
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

	if st, err := a.queue.Stats(); err == nil && st.Failed > 0 {
		add("queue", "warn", fmt.Sprintf("%d failed job(s)", st.Failed), "agentctl list --state failed; then agentctl retry ID|--all or drop ID")
	} else if err == nil {
		add("queue", "ok", fmt.Sprintf("%d pending, %d retrying", st.Pending, st.Retrying), "")
	}
	return checks
}

// doctorBucket makes a real put/head/delete round trip of a small probe
// object (writes) and checks nix-cache-info.
func (a *Agent) doctorBucket(ctx context.Context, add func(name, status, detail, hint string), writes bool) {
	if writes && !a.doctorBucketWrites(ctx, add) {
		return
	}
	data, _, err := a.bucket.Get(ctx, "nix-cache-info", 64<<10)
	switch {
	case bucket.IsNotExist(err):
		add("nix-cache-info", "fail", "missing", "agentd writes it at start when the cache is reachable; restart agentd. Without it Nix refuses the cache (\"does not appear to be a binary cache\")")
	case err != nil:
		add("nix-cache-info", "fail", err.Error(), "")
	case !strings.Contains(string(data), "StoreDir: "+storepath.DefaultStoreDir):
		add("nix-cache-info", "fail", strings.TrimSpace(string(data)), "this cache is for another store directory; Nix clients with /nix/store will refuse it")
	default:
		add("nix-cache-info", "ok", strings.ReplaceAll(strings.TrimSpace(string(data)), "\n", ", "), "")
	}
	if writes {
		a.doctorGCStore(ctx, add)
	}
	if err := a.gc.watcher.LastError(); err != nil {
		add("gc announcements", "fail", err.Error(),
			"narinfo writes wait until the announcements can be read. An announcement that cannot be decoded was written by a newer collector or is damaged: upgrade agentd, or delete that object with the store's own tools once no collector runs")
	}
}

// doctorBucketWrites puts, heads and deletes a probe object; it reports
// whether that worked.
func (a *Agent) doctorBucketWrites(ctx context.Context, add func(name, status, detail, hint string)) bool {
	var rnd [6]byte
	rand.Read(rnd[:])
	host, _ := os.Hostname()
	key := "nixspool-probe/" + host + "-" + hex.EncodeToString(rnd[:])
	body := "nixspool doctor probe\n"
	_, err := a.bucket.Put(ctx, key, strings.NewReader(body), int64(len(body)), bucket.PutOptions{ContentType: "text/plain"})
	if err == nil {
		var info bucket.Info
		info, err = a.bucket.Stat(ctx, key)
		if err == nil && info.Size != int64(len(body)) {
			err = fmt.Errorf("probe object has %d bytes, want %d", info.Size, len(body))
		}
		if derr := a.bucket.Delete(ctx, key); err == nil {
			err = derr
		}
	}
	switch {
	case err == nil:
		a.setReachable(true)
		add("cache", "ok", a.bucket.String()+": put, head and delete of a probe object work", "")
	case bucket.IsPermanent(err):
		add("cache", "fail", err.Error(), "the bucket refuses: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile=, the credentials file), the bucket name and region, and that the policy allows s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket")
	case errors.Is(err, bucket.ErrUnavailable):
		add("cache", "fail", err.Error(), "the cache cannot be reached: check endpoint=, scheme= (https unless scheme=http) and the network")
	default:
		add("cache", "fail", err.Error(), "check the cache URL and permissions")
	}
	return err == nil
}

// doctorGCStore reports what garbage collection needs of the store
// (docs/gc.md, "Assumptions"): conditional writes, and how well the
// store's clock is known.
func (a *Agent) doctorGCStore(ctx context.Context, add func(name, status, detail, hint string)) {
	if err := bucket.CheckListable(a.bucket); err != nil {
		add("gc store checks", "ok", "not applicable: "+err.Error()+", so nixspool does not collect it", "")
		return
	}
	sc, err := gc.CheckStore(ctx, a.bucket)
	if err != nil {
		add("gc store checks", "warn", err.Error(), "")
		return
	}
	detail := fmt.Sprintf("store clock known to within %s; If-None-Match honoured: %v; If-Match honoured: %v; listings lag %s",
		sc.ClockBound.Round(time.Millisecond), sc.IfNoneMatch, sc.IfMatch, sc.ListLag.Round(time.Millisecond))
	if p := sc.Problem(a.cfg.GCGrace); p != "" {
		add("gc store checks", "warn", detail, p)
		return
	}
	add("gc store checks", "ok", detail, "")
}
