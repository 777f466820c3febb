// Package open opens the bucket a cache URL names: S3 for s3://, a local
// directory for file://.
package open

import (
	"github.com/nixspool/nixspool/bucket"
	filebucket "github.com/nixspool/nixspool/bucket/file"
	s3bucket "github.com/nixspool/nixspool/bucket/s3"
	"github.com/nixspool/nixspool/cacheurl"
)

// Cache returns the bucket of the cache c.
func Cache(c *cacheurl.Cache) (bucket.Bucket, error) {
	if c.Scheme == "file" {
		return filebucket.New(c.Dir)
	}
	return s3bucket.New(c)
}
