package main

// The request mix of one tiny path: what agentd sends per path, read off a
// proxy with no delay, so that the plain client baseline issues the same.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/testenv"
)

var tinyJobs = flag.Int("tiny-jobs", 64, "tiny: agentd's --jobs (its default), and the plain client's paths at once")

// replayed are the request kinds the plain client sends per path; the rest
// (the agent's start: probes, the bucket's location) are printed only.
var replayed = map[string]bool{"PUT nar": true, "PUT narinfo": true, "HEAD narinfo": true, "GET nix-cache-info": true, "GET listing": true}

// requestKind names a request by method and the kind of key it touches.
func requestKind(r testenv.ProxiedRequest) string {
	p := r.Path
	if i := strings.Index(p[1:], "/"); i >= 0 {
		p = p[i+2:] // without the bucket
	} else {
		p = ""
	}
	kind := "other"
	switch {
	case p == "nix-cache-info":
		kind = "nix-cache-info"
	case strings.HasSuffix(p, ".narinfo"):
		kind = "narinfo"
	case strings.HasPrefix(p, "nar/"):
		kind = "nar"
	case p == "" && strings.Contains(r.Query, "list-type"):
		kind = "listing"
	case p == "":
		kind = "bucket"
	}
	return r.Method + " " + kind
}

// traceTiny pushes paths through a proxy without delay and returns the
// requests per kind.
func (b *bench) traceTiny(m *testenv.MinIO, paths []string) (map[string]int, error) {
	p := testenv.StartDelayProxy(b.t, m.Endpoint, 0, 0)
	defer p.Close()
	name := b.bucketName()
	m.MakeBucket(name)
	sock, cmdA, err := b.agent("tinytrace-"+randHex()[:6], m.BucketURLVia(p.Endpoint, name, ""), m.Env(), "--jobs", strconv.Itoa(*tinyJobs))
	if err != nil {
		return nil, err
	}
	defer stop(cmdA)
	if err := push(sock, paths); err != nil {
		return nil, err
	}
	if err := waitUploaded(sock, uint64(len(paths)), 10*time.Minute); err != nil {
		return nil, err
	}
	mix := map[string]int{}
	for _, r := range p.Requests() {
		mix[requestKind(r)]++
	}
	var keys []string
	for k := range mix {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Fprintf(os.Stderr, "requests for %d tiny paths:\n", len(paths))
	for _, k := range keys {
		note := ""
		if !replayed[k] {
			note = "  (not replayed by the plain client)"
		}
		fmt.Fprintf(os.Stderr, "  %-22s %6d  (%.2f per path)%s\n", k, mix[k], float64(mix[k])/float64(len(paths)), note)
	}
	return mix, nil
}

// plainTiny is the baseline for the tiny row: a plain S3 client (minio-go,
// nothing of nixspool's) sending, for n paths at the same concurrency as
// agentd's workers, what agentd sent per path in the traced run (mix, for
// traced paths): a NAR PUT, a create-only narinfo PUT, and the checks (HEAD
// of the narinfo, GET of nix-cache-info, listings) at the same rate. It returns
// paths/s.
func (b *bench) plainTiny(m *testenv.MinIO, mix map[string]int, traced, n, workers int) (float64, error) {
	name := b.bucketName()
	m.MakeBucket(name)
	c := b.clientVia(m.Endpoint)
	ctx := context.Background()
	if _, err := c.PutObject(ctx, name, "nix-cache-info", strings.NewReader("StoreDir: /nix/store\n"), -1, minio.PutObjectOptions{}); err != nil {
		return 0, err
	}
	// every returns whether path i sends a request of this kind, spread
	// evenly at the traced rate.
	every := func(kind string, i int) bool {
		k := mix[kind]
		return k*(i+1)/traced > k*i/traced
	}
	nar := strings.Repeat("n", 200)
	narinfo := strings.Repeat("i", 450)
	t0 := time.Now()
	err := parallel(workers, n, func(i int) error {
		h := fmt.Sprintf("%032d", i)
		if every("GET listing", i) {
			for o := range c.ListObjects(ctx, name, minio.ListObjectsOptions{Prefix: h[len(h)-1:], MaxKeys: 1000}) {
				if o.Err != nil {
					return o.Err
				}
			}
		}
		if every("HEAD narinfo", i) {
			if _, err := c.StatObject(ctx, name, cachefmt.Keys.Narinfo(h), minio.StatObjectOptions{}); err != nil && minio.ToErrorResponse(err).StatusCode != 404 {
				return err
			}
		}
		if _, err := c.PutObject(ctx, name, cachefmt.Keys.NAR(h, ".zst"), strings.NewReader(nar), int64(len(nar)), minio.PutObjectOptions{}); err != nil {
			return err
		}
		var po minio.PutObjectOptions
		po.SetMatchETagExcept("*")
		if _, err := c.PutObject(ctx, name, cachefmt.Keys.Narinfo(h), strings.NewReader(narinfo), int64(len(narinfo)), po); err != nil {
			return err
		}
		if every("GET nix-cache-info", i) {
			o, err := c.GetObject(ctx, name, "nix-cache-info", minio.GetObjectOptions{})
			if err != nil {
				return err
			}
			_, err = io.Copy(io.Discard, o)
			o.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return float64(n) / time.Since(t0).Seconds(), nil
}
