// Package cacheurl parses binary cache addresses the way Nix users write
// them: s3://BUCKET?endpoint=…&region=…&scheme=…&profile=… with Nix's upload
// options, or file:///ABS/DIR.
package cacheurl

import (
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
)

// Cache is a parsed cache address.
type Cache struct {
	Scheme string // "s3" or "file"

	// s3
	Bucket    string
	Prefix    string // key prefix inside the bucket ("" or "dir/")
	Endpoint  string // host[:port]; "" means AWS
	Region    string
	Secure    bool // https unless scheme=http
	Profile   string
	PathStyle string // "auto", "path" or "virtual"

	// file
	Dir string

	// Upload options (Nix's names).
	Compression        string // "zstd", "xz" or "none"
	CompressionLevel   int    // -1: the algorithm's default
	WriteNARListing    bool
	NarinfoCompression string // "", "br", "gzip" or "zstd"
	LsCompression      string
	LogCompression     string
	Priority           int
	WantMassQuery      bool
}

// Parse parses a cache URL. Unknown or malformed parameters are errors that
// name the parameter.
func Parse(raw string) (*Cache, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("cache URL: %w", err)
	}
	c := &Cache{Scheme: u.Scheme, Compression: "zstd", CompressionLevel: -1, Priority: 40, WantMassQuery: true, Region: "us-east-1", Secure: true, PathStyle: "auto"}
	switch u.Scheme {
	case "s3":
		if u.Host == "" {
			return nil, fmt.Errorf("cache URL %q: no bucket (want s3://BUCKET?…)", raw)
		}
		if u.User != nil {
			return nil, fmt.Errorf("cache URL: credentials do not belong in the URL; use the AWS credential chain")
		}
		c.Bucket = u.Host
		if p := strings.Trim(u.Path, "/"); p != "" {
			c.Prefix = p + "/"
		}
	case "file":
		if u.Host != "" {
			return nil, fmt.Errorf("cache URL %q: file URLs need an absolute path (file:///DIR)", raw)
		}
		if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
			return nil, fmt.Errorf("cache URL %q: file URLs need a clean absolute path", raw)
		}
		c.Dir = u.Path
	default:
		return nil, fmt.Errorf("cache URL %q: scheme must be s3:// or file://", raw)
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("cache URL query: %w", err)
	}
	// Metadata compression travels as Content-Encoding, which only HTTP
	// (S3) readers undo; a file:// reader would get compressed bytes.
	s3Only := map[string]bool{"endpoint": true, "region": true, "aws-region": true, "scheme": true, "profile": true, "addressing-style": true,
		"narinfo-compression": true, "ls-compression": true, "log-compression": true}
	for key, vals := range q {
		if len(vals) != 1 {
			return nil, fmt.Errorf("cache URL parameter %q given %d times", key, len(vals))
		}
		v := vals[0]
		bad := func(want string) error {
			return fmt.Errorf("cache URL parameter %s=%q: want %s", key, v, want)
		}
		if s3Only[key] && c.Scheme != "s3" {
			return nil, fmt.Errorf("cache URL parameter %q only applies to s3:// caches", key)
		}
		switch key {
		case "endpoint":
			if v == "" || strings.Contains(v, "/") {
				return nil, bad("host[:port]")
			}
			c.Endpoint = v
		case "region", "aws-region":
			if v == "" {
				return nil, bad("a region name")
			}
			c.Region = v
		case "scheme":
			switch v {
			case "http":
				c.Secure = false
			case "https":
				c.Secure = true
			default:
				return nil, bad("http or https")
			}
		case "profile":
			c.Profile = v
		case "addressing-style":
			switch v {
			case "auto", "path", "virtual":
				c.PathStyle = v
			default:
				return nil, bad("auto, path or virtual")
			}
		case "compression":
			switch v {
			case "zstd", "xz", "none":
				c.Compression = v
			default:
				return nil, bad("zstd, xz or none")
			}
		case "compression-level":
			n, err := strconv.Atoi(v)
			if err != nil || n < -1 || n > 22 {
				return nil, bad("an integer from -1 to 22")
			}
			c.CompressionLevel = n
		case "write-nar-listing", "want-mass-query":
			b, err := parseBool(v)
			if err != nil {
				return nil, bad("true or false")
			}
			if key == "write-nar-listing" {
				c.WriteNARListing = b
			} else {
				c.WantMassQuery = b
			}
		case "narinfo-compression", "ls-compression", "log-compression":
			switch v {
			case "", "br", "gzip", "zstd":
			default:
				return nil, bad("br, gzip or zstd (what every Nix reader decodes)")
			}
			switch key {
			case "narinfo-compression":
				c.NarinfoCompression = v
			case "ls-compression":
				c.LsCompression = v
			default:
				c.LogCompression = v
			}
		case "priority":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return nil, bad("a non-negative integer")
			}
			c.Priority = n
		default:
			return nil, fmt.Errorf("cache URL parameter %q is not supported", key)
		}
	}
	return c, nil
}

func parseBool(s string) (bool, error) {
	switch s {
	case "1", "true":
		return true, nil
	case "0", "false":
		return false, nil
	}
	return false, fmt.Errorf("not a boolean")
}

// Identity names the place objects go (endpoint, bucket and prefix, or the
// directory), without options or secrets. Two caches with the same identity
// hold the same objects.
func (c *Cache) Identity() string {
	if c.Scheme == "file" {
		return "file://" + c.Dir
	}
	ep := c.Endpoint
	if ep == "" {
		ep = "aws:" + c.Region
	}
	return "s3://" + ep + "/" + c.Bucket + "/" + c.Prefix
}

// String renders the address for logs and status: no credentials are ever
// part of a Cache, so this is safe to show.
func (c *Cache) String() string {
	if c.Scheme == "file" {
		return "file://" + c.Dir
	}
	s := "s3://" + c.Bucket
	if c.Prefix != "" {
		s += "/" + strings.TrimSuffix(c.Prefix, "/")
	}
	v := url.Values{}
	if c.Endpoint != "" {
		v.Set("endpoint", c.Endpoint)
	}
	v.Set("region", c.Region)
	if !c.Secure {
		v.Set("scheme", "http")
	}
	if c.Profile != "" {
		v.Set("profile", c.Profile)
	}
	return s + "?" + v.Encode()
}
