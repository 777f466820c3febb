// Package audit checks that a binary cache is one stock Nix can use: every
// narinfo parses, names its own store path, points at a NAR object that
// exists with the size and compression it claims, and every reference has a
// narinfo; every realisation parses, is what its key says, and its output
// has a narinfo; the realisations it depends on are in the cache and agree
// on their outputs (what Nix 2.8 needs to substitute by derivation). With
// Deep, every NAR is
// also downloaded and must hash to FileHash and decompress to NarHash and
// NarSize. It only reads.
//
// It lists the cache once, then reads the narinfos (and the first bytes of
// each NAR) with bounded concurrency, so a cache of 100,000 paths costs one
// listing page per 1,000 objects plus two small GETs per path. An object
// the listing misses because it was written during the audit is confirmed
// with a HEAD before it is reported missing, so an audit running beside
// uploads does not report what is merely new.
package audit

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"golang.org/x/sync/errgroup"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/limit"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/realisation"
	"github.com/nixspool/nixspool/storepath"
)

// Options tune an audit.
type Options struct {
	// Deep downloads every NAR and checks FileHash, NarHash and NarSize.
	Deep bool
	// Concurrency bounds requests in flight (default 32).
	Concurrency int
	// TrustedKeys, if any, require every narinfo to carry a valid
	// signature by one of them.
	TrustedKeys []signature.PublicKey
	// Progress, if set, is called now and then with the narinfos checked
	// so far and the total.
	Progress func(done, total int)
	// Upstreams are caches clients also substitute from (e.g.
	// cache.nixos.org for a cache filled with --skip-signed-by): a
	// reference this cache lacks is fine if an upstream has it.
	Upstreams []Upstream
}

// Upstream is another cache a reference may be served from.
type Upstream interface {
	// HasNarinfo reports whether the upstream has a narinfo for hash.
	HasNarinfo(ctx context.Context, hash string) (bool, error)
	String() string
}

// Problem kinds.
const (
	KindCacheInfo        = "nix-cache-info"
	KindUnreadable       = "unreadable"
	KindUnparsable       = "unparsable"
	KindStorePath        = "store-path"
	KindMissingNAR       = "missing-nar"
	KindNARSize          = "nar-size"
	KindCompression      = "compression"
	KindContentEncoding  = "content-encoding"
	KindMissingRef       = "missing-reference"
	KindSignature        = "signature"
	KindHash             = "hash"
	KindRealisation      = "realisation"
	KindRealisationOuput = "realisation-output"
	KindRealisationDep   = "realisation-dependency"
)

// Problem is one thing stock Nix would trip over.
type Problem struct {
	Key    string `json:"key"`
	Kind   string `json:"kind"`
	Detail string `json:"detail"`
}

func (p Problem) String() string { return p.Kind + " " + p.Key + ": " + p.Detail }

// Report is the outcome of an audit.
type Report struct {
	Objects      int   `json:"objects"`
	Narinfos     int   `json:"narinfos"`
	NARs         int   `json:"nars"`
	NARBytes     int64 `json:"nar_file_bytes"`
	Listings     int   `json:"listings"`
	Logs         int   `json:"logs"`
	Realisations int   `json:"realisations"`
	// OrphanNARs are NAR objects no narinfo points at (left by interrupted
	// uploads, or by another tool); harmless, and collected by gc.
	OrphanNARs     int           `json:"orphan_nars"`
	OrphanNARBytes int64         `json:"orphan_nar_bytes"`
	Requests       int64         `json:"requests"`
	Duration       time.Duration `json:"duration_ns"`
	Deep           bool          `json:"deep"`
	Problems       []Problem     `json:"problems"`
}

// OK reports whether the audit found no problem.
func (r *Report) OK() bool { return len(r.Problems) == 0 }

// Summary is a one-line account of the report.
func (r *Report) Summary() string {
	what := "audit"
	if r.Deep {
		what = "deep audit"
	}
	verdict := "healthy"
	if !r.OK() {
		verdict = fmt.Sprintf("%d PROBLEM(S)", len(r.Problems))
	}
	return fmt.Sprintf("%s: %s: %d narinfos, %d NARs (%s), %d listings, %d logs, %d realisations, %d orphan NARs (%s); %d requests in %s",
		what, verdict, r.Narinfos, r.NARs, humanBytes(r.NARBytes), r.Listings, r.Logs, r.Realisations,
		r.OrphanNARs, humanBytes(r.OrphanNARBytes), r.Requests, r.Duration.Round(time.Millisecond))
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return strconv.FormatInt(n, 10) + " B"
}

type auditor struct {
	b     bucket.Bucket
	opt   Options
	keys  map[string]bucket.Info
	reqs  atomic.Int64
	mu    sync.Mutex
	probs []Problem
	// per narinfo (by hash): what the second pass needs
	refs map[string][]string // hash → reference hashes
	urls map[string]bool     // NAR keys narinfos point at
	// realisations (realisations/ layout): id → output base name, and
	// key → dependencies (id → output base name) for the second pass
	realOut  map[string]string
	realDeps map[string]map[string]string
}

func (a *auditor) problem(key, kind, format string, args ...any) {
	a.mu.Lock()
	a.probs = append(a.probs, Problem{Key: key, Kind: kind, Detail: fmt.Sprintf(format, args...)})
	a.mu.Unlock()
}

// Run audits the cache in b.
func Run(ctx context.Context, b bucket.Bucket, opt Options) (*Report, error) {
	start := time.Now()
	if err := bucket.CheckListable(b); err != nil {
		return nil, fmt.Errorf("audit refused: %w, and the audit reads the whole cache; audit the directory or bucket behind it (agentd audit --cache file://… or s3://…) instead", err)
	}
	if opt.Concurrency <= 0 {
		opt.Concurrency = 32
	}
	// A store that throttles gets fewer requests at once, and a request it
	// refused for now is asked again before anything counts as unreadable.
	b = &retrying{Bucket: limit.Wrap(b, limit.New(limit.Options{Min: 2, Max: opt.Concurrency, Initial: opt.Concurrency}))}
	a := &auditor{b: b, opt: opt, keys: map[string]bucket.Info{}, refs: map[string][]string{}, urls: map[string]bool{},
		realOut: map[string]string{}, realDeps: map[string]map[string]string{}}
	rep := &Report{Deep: opt.Deep}
	var narinfos, realisations []string
	err := b.List(ctx, bucket.ListOptions{Recursive: true}, func(o bucket.Object) error {
		a.keys[o.Key] = o.Info
		switch cachefmt.Keys.Kind(o.Key) {
		case cachefmt.KindNarinfo:
			narinfos = append(narinfos, o.Key)
		case cachefmt.KindNAR:
			rep.NARs++
			rep.NARBytes += o.Size
		case cachefmt.KindListing:
			rep.Listings++
		case cachefmt.KindLog:
			rep.Logs++
		case cachefmt.KindRealisation:
			realisations = append(realisations, o.Key)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	rep.Objects = len(a.keys)
	rep.Narinfos = len(narinfos)
	rep.Realisations = len(realisations)
	a.reqs.Add(int64(len(a.keys)/1000 + 1))

	a.checkCacheInfo(ctx)

	var done atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(opt.Concurrency)
	stopProgress := a.progress(&done, len(narinfos))
	for _, key := range narinfos {
		g.Go(func() error {
			defer done.Add(1)
			return a.checkNarinfo(gctx, key)
		})
	}
	for _, key := range realisations {
		g.Go(func() error { return a.checkRealisation(gctx, key) })
	}
	err = g.Wait()
	stopProgress()
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}

	// References, now that every narinfo is known.
	for h, refs := range a.refs {
		for _, r := range refs {
			if _, ok := a.refs[r]; ok {
				continue
			}
			if !a.exists(ctx, cachefmt.Keys.Narinfo(r)) && !a.upstreamHas(ctx, r) {
				a.problem(cachefmt.Keys.Narinfo(h), KindMissingRef, "references %s, which has no narinfo in the cache%s", r, a.upstreamNote())
			}
		}
	}
	a.checkRealisationDeps(ctx)
	for k, info := range a.keys {
		if cachefmt.Keys.IsNAR(k) && !a.urls[k] {
			rep.OrphanNARs++
			rep.OrphanNARBytes += info.Size
		}
	}
	sort.Slice(a.probs, func(i, j int) bool {
		if a.probs[i].Key != a.probs[j].Key {
			return a.probs[i].Key < a.probs[j].Key
		}
		return a.probs[i].Detail < a.probs[j].Detail
	})
	rep.Problems = a.probs
	rep.Requests = a.reqs.Load()
	rep.Duration = time.Since(start)
	return rep, nil
}

func (a *auditor) progress(done *atomic.Int64, total int) (stop func()) {
	if a.opt.Progress == nil {
		return func() {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-quit:
				a.opt.Progress(int(done.Load()), total)
				return
			case <-t.C:
				a.opt.Progress(int(done.Load()), total)
			}
		}
	}()
	return func() { close(quit); wg.Wait() }
}

// exists confirms with a HEAD that key exists: the listing may predate it.
func (a *auditor) exists(ctx context.Context, key string) bool {
	a.mu.Lock()
	_, listed := a.keys[key]
	a.mu.Unlock()
	if listed {
		return true
	}
	a.reqs.Add(1)
	_, err := a.b.Stat(ctx, key)
	return err == nil
}

func (a *auditor) upstreamHas(ctx context.Context, hash string) bool {
	for _, up := range a.opt.Upstreams {
		a.reqs.Add(1)
		if ok, err := up.HasNarinfo(ctx, hash); err == nil && ok {
			return true
		}
	}
	return false
}

func (a *auditor) upstreamNote() string {
	if len(a.opt.Upstreams) == 0 {
		return ""
	}
	var names []string
	for _, up := range a.opt.Upstreams {
		names = append(names, up.String())
	}
	return " nor upstream (" + strings.Join(names, ", ") + ")"
}

func (a *auditor) checkCacheInfo(ctx context.Context) {
	a.reqs.Add(1)
	data, _, err := a.b.Get(ctx, cachefmt.CacheInfoKey, 64<<10)
	switch {
	case bucket.IsNotExist(err):
		a.problem(cachefmt.CacheInfoKey, KindCacheInfo, "missing: stock Nix refuses the cache (\"does not appear to be a binary cache\")")
	case err != nil:
		a.problem(cachefmt.CacheInfoKey, KindCacheInfo, "unreadable: %v", err)
	default:
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "StoreDir: "); ok {
				if v != storepath.DefaultStoreDir {
					a.problem(cachefmt.CacheInfoKey, KindCacheInfo, "StoreDir is %s; clients with %s refuse the cache", v, storepath.DefaultStoreDir)
				}
				return
			}
		}
		a.problem(cachefmt.CacheInfoKey, KindCacheInfo, "no StoreDir line")
	}
}

func (a *auditor) checkNarinfo(ctx context.Context, key string) error {
	hash := cachefmt.Keys.NarinfoHash(key)
	a.reqs.Add(1)
	data, info, err := a.b.Get(ctx, key, cachefmt.MaxNarinfoSize)
	if bucket.IsNotExist(err) {
		return nil // deleted since the listing (a collector at work)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		a.problem(key, KindUnreadable, "%v", err)
		return nil
	}
	if data, err = cachefmt.DecodeContentEncoding(info.ContentEncoding, data); err != nil {
		a.problem(key, KindUnparsable, "%v", err)
		return nil
	}
	ni, err := cachefmt.ParseNarInfo(data)
	if err != nil {
		a.problem(key, KindUnparsable, "%v", err)
		return nil
	}
	if ni.HashPart() != hash || storepath.Check(storepath.DefaultStoreDir, ni.StorePath) != nil {
		a.problem(key, KindStorePath, "StorePath %s does not belong under this key", ni.StorePath)
		return nil
	}
	var refs []string
	for _, r := range ni.References {
		rh := cachefmt.RefHash(r)
		if rh == "" {
			a.problem(key, KindUnparsable, "reference %q is not a store path base name", r)
			continue
		}
		if rh != hash {
			refs = append(refs, rh)
		}
	}
	a.mu.Lock()
	a.refs[hash] = refs
	a.urls[ni.URL] = true
	a.mu.Unlock()
	if len(a.opt.TrustedKeys) > 0 {
		a.checkSignature(key, ni)
	}
	return a.checkNAR(ctx, key, ni)
}

// checkNAR checks the NAR object: it exists, has FileSize bytes, its first
// bytes are of the compression the narinfo claims, it is not served with a
// Content-Encoding (a client would decode it twice); with Deep, its hashes.
func (a *auditor) checkNAR(ctx context.Context, key string, ni *cachefmt.NarInfo) error {
	comp := ni.EffectiveCompression()
	if ext := cachefmt.Extension(comp); ext != "" && !strings.HasSuffix(ni.URL, ext) && cachefmt.Keys.IsNAR(ni.URL) {
		a.problem(key, KindCompression, "Compression: %s but the URL %s lacks the %s extension", comp, ni.URL, ext)
	}
	length := int64(cachefmt.MagicLen)
	if a.opt.Deep {
		length = -1
	}
	a.reqs.Add(1)
	rc, info, err := a.b.Open(ctx, ni.URL, 0, length)
	if bucket.IsNotExist(err) {
		if !a.exists(ctx, key) {
			return nil // the narinfo went away meanwhile (collector)
		}
		a.problem(key, KindMissingNAR, "its NAR %s does not exist", ni.URL)
		return nil
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		a.problem(key, KindUnreadable, "NAR %s: %v", ni.URL, err)
		return nil
	}
	defer rc.Close()
	if ni.FileSize >= 0 && info.Size != ni.FileSize {
		a.problem(key, KindNARSize, "FileSize %d but %s has %d bytes", ni.FileSize, ni.URL, info.Size)
	}
	if info.ContentEncoding != "" && info.ContentEncoding != "identity" {
		a.problem(key, KindContentEncoding, "%s is served with Content-Encoding: %s; clients would decode it twice", ni.URL, info.ContentEncoding)
	}
	head := make([]byte, cachefmt.MagicLen)
	n, err := io.ReadFull(rc, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		a.problem(key, KindUnreadable, "NAR %s: %v", ni.URL, err)
		return nil
	}
	head = head[:n]
	if got := cachefmt.DetectCompression(head); got != "" && got != comp {
		a.problem(key, KindCompression, "Compression: %s but %s is %s", comp, ni.URL, got)
		return nil
	}
	if a.opt.Deep {
		a.checkHashes(key, ni, io.MultiReader(bytes.NewReader(head), rc))
	}
	return nil
}

// checkHashes streams the NAR file: its SHA-256 must be FileHash, and its
// decompressed bytes must hash to NarHash and count NarSize.
func (a *auditor) checkHashes(key string, ni *cachefmt.NarInfo, r io.Reader) {
	fileHash := sha256.New()
	dec, err := cachefmt.Decompress(ni.EffectiveCompression(), io.TeeReader(r, fileHash))
	if err != nil {
		a.problem(key, KindHash, "cannot decompress %s: %v", ni.URL, err)
		return
	}
	defer dec.Close()
	narHash := sha256.New()
	n, err := io.Copy(narHash, dec)
	if err != nil {
		a.problem(key, KindHash, "%s does not decompress as %s: %v", ni.URL, ni.EffectiveCompression(), err)
		return
	}
	io.Copy(fileHash, r) // trailing bytes after the compressed stream count too
	if want, ok := digest(ni.NarHash); !ok || !bytes.Equal(want, narHash.Sum(nil)) || n != ni.NarSize {
		a.problem(key, KindHash, "NAR of %s does not match NarHash %s / NarSize %d (got %d bytes)", ni.StorePath, ni.NarHash, ni.NarSize, n)
	}
	if ni.FileHash != "" {
		if want, ok := digest(ni.FileHash); !ok || !bytes.Equal(want, fileHash.Sum(nil)) {
			a.problem(key, KindHash, "%s does not match FileHash %s", ni.URL, ni.FileHash)
		}
	}
}

func digest(s string) ([]byte, bool) {
	h, err := nixhash.ParseAny(s, nil)
	if err != nil || h.Algo() != nixhash.SHA256 {
		return nil, false
	}
	return h.Digest(), true
}

// Fingerprint is what a narinfo's signatures sign (Nix's
// ValidPathInfo::fingerprint): the NarHash in sha256:nix32 form and the
// references as absolute paths, sorted.
func Fingerprint(ni *cachefmt.NarInfo) (string, error) {
	h, err := nixhash.ParseAny(ni.NarHash, nil)
	if err != nil {
		return "", err
	}
	refs := make([]string, len(ni.References))
	for i, r := range ni.References {
		refs[i] = storepath.DefaultStoreDir + "/" + r
	}
	sort.Strings(refs)
	return "1;" + ni.StorePath + ";" + h.Format(nixhash.NixBase32, true) + ";" + strconv.FormatInt(ni.NarSize, 10) + ";" + strings.Join(refs, ","), nil
}

func (a *auditor) checkSignature(key string, ni *cachefmt.NarInfo) {
	fp, err := Fingerprint(ni)
	if err != nil {
		a.problem(key, KindSignature, "NarHash %q: %v", ni.NarHash, err)
		return
	}
	for _, s := range ni.Sigs {
		sig, err := signature.ParseSignature(s)
		if err != nil {
			continue
		}
		for _, k := range a.opt.TrustedKeys {
			if k.Name == sig.Name && k.Verify(fp, sig) {
				return
			}
		}
	}
	a.problem(key, KindSignature, "no valid signature by a trusted key (has %d signature(s))", len(ni.Sigs))
}

// checkRealisation checks a realisation in either layout: it parses, is
// what its key says, is signed by a trusted key (when keys are given), and
// its output path has a narinfo.
func (a *auditor) checkRealisation(ctx context.Context, key string) error {
	a.reqs.Add(1)
	data, _, err := a.b.Get(ctx, key, 1<<20)
	if bucket.IsNotExist(err) {
		return nil
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		a.problem(key, KindUnreadable, "%v", err)
		return nil
	}
	var outPath string
	if id, ok := cachefmt.Keys.RealisationID(key); ok {
		r, err := nixstore.ParseRealisation(data)
		if err != nil {
			a.problem(key, KindRealisation, "%v", err)
			return nil
		}
		if r.ID != id {
			a.problem(key, KindRealisation, "holds the realisation of %s, not of the %s its key names", r.ID, id)
			return nil
		}
		if len(a.opt.TrustedKeys) > 0 && !a.signedByTrusted(string(realisation.Fingerprint(r)), r.Signatures) {
			a.problem(key, KindSignature, "no valid signature by a trusted key (has %d signature(s))", len(r.Signatures))
		}
		a.mu.Lock()
		a.realOut[r.ID] = r.OutPath
		if len(r.DependentRealisations) > 0 {
			a.realDeps[key] = r.DependentRealisations
		}
		a.mu.Unlock()
		outPath = r.OutPath
	} else {
		drvBase, output := cachefmt.Keys.BuildTraceParts(key)
		if !strings.HasSuffix(drvBase, ".drv") || storepath.CheckBase(drvBase) != nil || output == "" || strings.Contains(output, "/") {
			a.problem(key, KindRealisation, "not build-trace-v2/<derivation>/<output>.doi")
			return nil
		}
		var r struct {
			OutPath    string            `json:"outPath"`
			Signatures []json.RawMessage `json:"signatures"`
		}
		if err := json.Unmarshal(data, &r); err != nil || r.OutPath == "" {
			a.problem(key, KindRealisation, "not a build trace entry (no outPath): %v", err)
			return nil
		}
		if len(a.opt.TrustedKeys) > 0 {
			sigs, err := buildTraceSigs(r.Signatures)
			if err != nil {
				a.problem(key, KindRealisation, "signatures: %v", err)
			} else if !a.signedByTrusted(string(realisation.BuildTraceFingerprint(drvBase, output, r.OutPath)), sigs) {
				a.problem(key, KindSignature, "no valid signature by a trusted key (has %d signature(s))", len(sigs))
			}
		}
		outPath = r.OutPath
	}
	h := cachefmt.RefHash(outPath)
	if h == "" {
		a.problem(key, KindRealisation, "outPath %q is not a store path", outPath)
		return nil
	}
	if !a.exists(ctx, cachefmt.Keys.Narinfo(h)) {
		a.problem(key, KindRealisationOuput, "its output %s has no narinfo", outPath)
	}
	return nil
}

// buildTraceSigs reads Nix 2.35's signatures: "name:base64" strings or
// {"keyName": …, "sig": base64} objects.
func buildTraceSigs(raw []json.RawMessage) ([]string, error) {
	var out []string
	for _, m := range raw {
		var s string
		if json.Unmarshal(m, &s) == nil {
			out = append(out, s)
			continue
		}
		var o struct {
			KeyName string `json:"keyName"`
			Sig     string `json:"sig"`
		}
		if err := json.Unmarshal(m, &o); err != nil || o.KeyName == "" || o.Sig == "" {
			return nil, fmt.Errorf("%s is neither \"name:base64\" nor {keyName, sig}", m)
		}
		out = append(out, o.KeyName+":"+o.Sig)
	}
	return out, nil
}

func (a *auditor) signedByTrusted(fingerprint string, sigs []string) bool {
	for _, s := range sigs {
		sig, err := signature.ParseSignature(s)
		if err != nil {
			continue
		}
		for _, k := range a.opt.TrustedKeys {
			if k.Name == sig.Name && k.Verify(fingerprint, sig) {
				return true
			}
		}
	}
	return false
}

// checkRealisationDeps checks, once every realisation is read, that the
// realisations each one depends on are in the cache with the outputs it
// names: Nix substitutes them first and gives up on the whole derivation
// when one is missing.
func (a *auditor) checkRealisationDeps(ctx context.Context) {
	for key, deps := range a.realDeps {
		for id, out := range deps {
			got, ok := a.realOut[id]
			switch {
			case ok && got != out:
				a.problem(key, KindRealisationDep, "depends on %s realised by %s, but the cache realises it by %s", id, out, got)
			case !ok && !a.exists(ctx, realisation.Key(id)):
				a.problem(key, KindRealisationDep, "depends on %s, which has no realisation in the cache", id)
			}
		}
	}
}

// ParsePublicKeys parses Nix public keys (NAME:BASE64), as given to
// trusted-public-keys; each string may hold several, separated by spaces.
func ParsePublicKeys(list []string) ([]signature.PublicKey, error) {
	var keys []signature.PublicKey
	for _, s := range list {
		for _, f := range strings.Fields(s) {
			k, err := signature.ParsePublicKey(f)
			if err != nil {
				return nil, fmt.Errorf("public key %q: want NAME:BASE64 as in trusted-public-keys", f)
			}
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// Write prints one line per problem, then the summary.
func (r *Report) Write(w io.Writer) error {
	for _, p := range r.Problems {
		if _, err := fmt.Fprintln(w, "PROBLEM", p.String()); err != nil {
			return err
		}
	}
	_, err := fmt.Fprintln(w, r.Summary())
	return err
}
