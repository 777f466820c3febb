package uploader

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// cacheInfo reads and writes the cache's nix-cache-info, whose identity
// names the cache's generation (generationName).
type cacheInfo struct {
	bucket bucket.Bucket
	cache  *cacheurl.Cache
	// putNew writes create-only (publisher.putNew).
	putNew func(ctx context.Context, b bucket.Bucket, key string, body []byte, opts bucket.PutOptions) (bool, error)
	log    *slog.Logger
	// known: nix-cache-info is known to exist. No narinfo is written
	// before it: without it Nix refuses the whole cache.
	known atomic.Bool
}

// read returns nix-cache-info's identity, writing it first if it is
// missing (after calling missing, if set).
func (c *cacheInfo) read(ctx context.Context, missing func()) (bucket.Info, error) {
	info, err := c.stat(ctx)
	if bucket.IsNotExist(err) {
		if missing != nil {
			missing()
		}
		info, err = c.write(ctx)
	}
	if err != nil {
		return bucket.Info{}, fmt.Errorf("check nix-cache-info: %w", err)
	}
	return info, nil
}

// write creates nix-cache-info (create-only: of two agents writing it at
// once, one wins and both see the same object).
//
// The body ends with a line naming this write (Nix reads only the fields
// it knows and skips the others), so that every nix-cache-info nixspool
// writes has its own ETag: a bucket reset and filled again within the
// second of the previous write, which Last-Modified cannot tell apart, is
// still a new generation.
func (c *cacheInfo) write(ctx context.Context) (bucket.Info, error) {
	wmq := 0
	if c.cache.WantMassQuery {
		wmq = 1
	}
	body := fmt.Sprintf("StoreDir: %s\nWantMassQuery: %d\nPriority: %d\n%s: %s\n",
		storepath.DefaultStoreDir, wmq, c.cache.Priority, CacheInfoGenerationField, rand.Text())
	wrote, err := c.putNew(ctx, c.bucket, cachefmt.CacheInfoKey, []byte(body), bucket.PutOptions{ContentType: "text/x-nix-cache-info"})
	if err != nil {
		return bucket.Info{}, fmt.Errorf("write nix-cache-info: %w", err)
	}
	if wrote {
		c.log.Info("wrote nix-cache-info", "cache", c.cache.String())
	}
	return c.stat(ctx)
}

// stat reads nix-cache-info's identity with a GET rather than a HEAD: an
// error answer to a GET carries its reason, so a skewed clock or an
// expired token is never taken for an emptied bucket.
func (c *cacheInfo) stat(ctx context.Context) (bucket.Info, error) {
	_, info, err := c.bucket.Get(ctx, cachefmt.CacheInfoKey, 64<<10)
	return info, err
}

// CacheInfoGenerationField is the nix-cache-info field that names the
// write which created it.
const CacheInfoGenerationField = "NixspoolGeneration"

// generationName identifies one incarnation of the cache: its
// nix-cache-info object, which a reset or a recreated bucket replaces.
func generationName(info bucket.Info) string {
	return info.ETag + "@" + info.LastModified.UTC().Format(time.RFC3339Nano)
}
