// Package open opens the bucket a cache URL names: S3 for s3://, an HTTP
// binary cache for http:// and https://, a local directory for file://.
package open

import (
	"github.com/nixspool/nixspool/bucket"
	filebucket "github.com/nixspool/nixspool/bucket/file"
	"github.com/nixspool/nixspool/bucket/httpcache"
	s3bucket "github.com/nixspool/nixspool/bucket/s3"
	"github.com/nixspool/nixspool/cacheurl"
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
