package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/audit"
	"github.com/nixspool/nixspool/internal/bucket/open"
)

// errProblems makes agentd exit 1 without another message: the report
// already said what is wrong.
var errProblems = errors.New("")

// runAudit is `agentd audit`: the read-only cache audit without a running
// agentd, with credentials from the usual AWS chain.
func runAudit(args []string) error {
	fs := flag.NewFlagSet("agentd audit", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: agentd audit --cache URL [--deep] [--trusted-public-keys 'NAME:KEY …'] [--upstream URL]… [--json]\n\nChecks that stock Nix can use everything in the cache (read-only). Exit 0: healthy, 1: problems found.\n\nOptions:")
		fs.PrintDefaults()
	}
	cache := fs.String("cache", "", "binary cache URL (s3://BUCKET?… or file:///DIR)")
	deep := fs.Bool("deep", false, "also download every NAR and check FileHash, NarHash and NarSize")
	keys := fs.String("trusted-public-keys", "", "require every narinfo and realisation to be signed by one of these keys (space-separated)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	concurrency := fs.Int("concurrency", 32, "requests in flight")
	var upstreams multiFlag
	fs.Var(&upstreams, "upstream", "a cache clients also substitute from (https://…, s3://…, file://…): references it serves are not missing (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cache == "" || fs.NArg() > 0 {
		return errors.New("audit: --cache URL is required, and nothing else (see agentd audit --help)")
	}
	c, err := cacheurl.Parse(*cache)
	if err != nil {
		return fmt.Errorf("--cache: %w", err)
	}
	pubs, err := audit.ParsePublicKeys([]string{*keys})
	if err != nil {
		return fmt.Errorf("--trusted-public-keys: %w", err)
	}
	b, err := open.Cache(c)
	if err != nil {
		return err
	}
	var ups []audit.Upstream
	for _, u := range upstreams {
		up, err := openUpstream(u)
		if err != nil {
			return fmt.Errorf("--upstream %s: %w", u, err)
		}
		ups = append(ups, up)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep, err := audit.Run(ctx, b, audit.Options{Deep: *deep, TrustedKeys: pubs, Concurrency: *concurrency, Upstreams: ups})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(rep)
	} else {
		err = rep.Write(os.Stdout)
	}
	if err != nil {
		return err
	}
	if !rep.OK() {
		return errProblems
	}
	return nil
}

func openUpstream(raw string) (audit.Upstream, error) {
	if strings.HasPrefix(raw, "http://") || strings.HasPrefix(raw, "https://") {
		return audit.HTTPUpstream{URL: raw}, nil
	}
	c, err := cacheurl.Parse(raw)
	if err != nil {
		return nil, err
	}
	b, err := open.Cache(c)
	if err != nil {
		return nil, err
	}
	return audit.BucketUpstream{Bucket: b}, nil
}
