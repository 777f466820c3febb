// Package open opens the bucket a cache URL names: S3 for s3://, an HTTP
// binary cache for http:// and https://, a local directory for file://.
package open

import (
	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	filebucket "github.com/nixspool/nixspool/internal/bucket/file"
	"github.com/nixspool/nixspool/internal/bucket/httpcache"
	s3bucket "github.com/nixspool/nixspool/internal/bucket/s3"
)

// Cache returns the bucket of the cache c.
func Cache(c *cacheurl.Cache) (bucket.Bucket, error) {
	switch c.Scheme {
	case "file":
		return filebucket.New(c.Dir)
	case "http", "https":
		return httpcache.New(c)
	}
	return s3bucket.New(c)
}
