package audit

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
)

// BucketUpstream is an upstream cache reached through the bucket interface
// (s3:// or file://).
type BucketUpstream struct{ Bucket bucket.Bucket }

// HasNarinfo implements Upstream.
func (u BucketUpstream) HasNarinfo(ctx context.Context, hash string) (bool, error) {
	_, err := u.Bucket.Stat(ctx, cachefmt.Keys.Narinfo(hash))
	if bucket.IsNotExist(err) {
		return false, nil
	}
	return err == nil, err
}

func (u BucketUpstream) String() string { return u.Bucket.String() }

// HTTPUpstream is an upstream binary cache served over HTTP(S), such as
// https://cache.nixos.org: a HEAD of <URL>/<hash>.narinfo.
type HTTPUpstream struct {
	URL    string
	Client *http.Client
}

// HasNarinfo implements Upstream.
func (u HTTPUpstream) HasNarinfo(ctx context.Context, hash string) (bool, error) {
	c := u.Client
	if c == nil {
		c = &http.Client{Timeout: 30 * time.Second}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, strings.TrimSuffix(u.URL, "/")+"/"+cachefmt.Keys.Narinfo(hash), nil)
	if err != nil {
		return false, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		return true, nil
	case http.StatusNotFound, http.StatusForbidden:
		return false, nil
	}
	return false, fmt.Errorf("%s: HEAD %s.narinfo: %s", u.URL, hash, resp.Status)
}

func (u HTTPUpstream) String() string { return u.URL }
