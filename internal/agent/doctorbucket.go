package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/cachegc"
	"github.com/nixspool/nixspool/storepath"
)

// checkBucket makes a real put/head/delete round trip of a small probe
// object (writes) and checks nix-cache-info.
func (d *doctor) checkBucket(ctx context.Context, add addCheck, writes bool) {
	if writes && !d.checkBucketWrites(ctx, add) {
		return
	}
	data, _, err := d.bucket.Get(ctx, cachefmt.CacheInfoKey, 64<<10)
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
		d.checkGCStore(ctx, add)
	}
	if err := d.gc.watcher.LastError(); err != nil {
		add("gc announcements", "fail", err.Error(),
			"narinfo writes wait until the announcements can be read. An announcement that cannot be decoded was written by a newer collector or is damaged: upgrade agentd, or delete that object with the store's own tools once no collector runs")
	}
}

// checkBucketWrites puts, heads and deletes a probe object; it reports
// whether that worked.
func (d *doctor) checkBucketWrites(ctx context.Context, add addCheck) bool {
	var rnd [6]byte
	rand.Read(rnd[:])
	host, _ := os.Hostname()
	key := cachefmt.DoctorProbePrefix + host + "-" + hex.EncodeToString(rnd[:])
	body := "nixspool doctor probe\n"
	_, err := d.bucket.Put(ctx, key, strings.NewReader(body), int64(len(body)), bucket.PutOptions{ContentType: "text/plain"})
	if err == nil {
		var info bucket.Info
		info, err = d.bucket.Stat(ctx, key)
		if err == nil && info.Size != int64(len(body)) {
			err = fmt.Errorf("probe object has %d bytes, want %d", info.Size, len(body))
		}
		if derr := d.bucket.Delete(ctx, key); err == nil {
			err = derr
		}
	}
	switch {
	case err == nil:
		d.setReachable(true)
		add("cache", "ok", d.bucket.String()+": put, head and delete of a probe object work", "")
	case bucket.IsPermanent(err):
		add("cache", "fail", err.Error(), "the bucket refuses: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile=, the credentials file), the bucket name and region, and that the policy allows s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket")
	case errors.Is(err, bucket.ErrUnavailable):
		add("cache", "fail", err.Error(), "the cache cannot be reached: check endpoint=, scheme= (https unless scheme=http) and the network")
	default:
		add("cache", "fail", err.Error(), "check the cache URL and permissions")
	}
	return err == nil
}

// checkGCStore reports what garbage collection needs of the store
// (docs/gc.md, "Assumptions"): conditional writes, and how well the
// store's clock is known.
func (d *doctor) checkGCStore(ctx context.Context, add addCheck) {
	if err := bucket.CheckListable(d.bucket); err != nil {
		add("gc store checks", "ok", "not applicable: "+err.Error()+", so nixspool does not collect it", "")
		return
	}
	sc, err := cachegc.CheckStore(ctx, d.bucket)
	if err != nil {
		add("gc store checks", "warn", err.Error(), "")
		return
	}
	detail := fmt.Sprintf("store clock known to within %s; If-None-Match honoured: %v; If-Match honoured: %v; listings lag %s",
		sc.ClockBound.Round(time.Millisecond), sc.IfNoneMatch, sc.IfMatch, sc.ListLag.Round(time.Millisecond))
	if p := sc.Problem(d.cfg.GCGrace); p != "" {
		add("gc store checks", "warn", detail, p)
		return
	}
	add("gc store checks", "ok", detail, "")
}
