// Package cacheurl parses binary cache addresses the way Nix users write
// them: s3://BUCKET[/PREFIX]?endpoint=…&region=…&…, http(s)://HOST[/PATH]?…
// or file:///ABS/DIR, with every parameter Nix's S3, HTTP and local binary
// cache stores accept.
//
// The parameters, the stores that know each, what nixspool does with it
// and how Parse reads it are one table, Params: a parameter is honoured
// (it changes where or how objects are written), or accepted with no
// effect here (it only matters to Nix as a reader, or names a feature
// nixspool does not have) and then listed in Cache.NoEffect so that
// agentd and doctor can say so. Only a parameter
// Nix itself does not know for the store type is an error, and the error
// names it.
package cacheurl

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Cache is a parsed cache address.
type Cache struct {
	Scheme string // "s3", "http", "https" or "file"

	// s3
	Bucket      string
	Prefix      string // key prefix inside the bucket ("" or "dir/")
	Endpoint    string // host[:port]; "" means AWS
	Region      string
	Secure      bool // https unless scheme=http or an http:// endpoint
	Profile     string
	PathStyle   string // addressing-style as given: "auto", "path" or "virtual"
	VirtualHost bool   // resolved: requests go to BUCKET.ENDPOINT/KEY, else ENDPOINT/BUCKET/KEY
	// StorageClass is sent as x-amz-storage-class with every upload
	// ("" = the bucket's default).
	StorageClass string
	// PartSize is the smallest multipart part (multipart-chunk-size or
	// buffer-size); 0 means the uploader's default.
	PartSize uint64
	// MultipartThreshold is the object size below which an upload is a
	// single PUT (multipart-upload=true with multipart-threshold); 0 means
	// one part's size.
	MultipartThreshold int64
	// TLSCertificate and TLSPrivateKey are a client certificate for the
	// endpoint (PEM files).
	TLSCertificate string
	TLSPrivateKey  string

	// file
	Dir string

	// http, https: the cache's URL without parameters or trailing slash
	// (TLSCertificate and TLSPrivateKey apply too).
	URL string
	// NetrcFile names the netrc file with the credentials of an HTTP
	// cache. It is not part of the URL: agentd sets it (--netrc-file);
	// "" means Nix's default, if it exists.
	NetrcFile string

	// Upload options (Nix's names).
	Compression         string // one of WritableCompressions
	CompressionLevel    int    // -1: the method's default
	ParallelCompression bool   // as Nix 2.35: default true for zstd, false otherwise
	WriteNARListing     bool
	NarinfoCompression  string // "", "br", "gzip" or "zstd"
	LsCompression       string
	LogCompression      string
	Priority            int
	WantMassQuery       bool
	// SecretKeyFiles are signing keys named by secret-key= and
	// secret-keys= (in that order); agentd adds them to --secret-key-file.
	SecretKeyFiles []string

	// NoEffect lists the parameters given that have no effect here,
	// sorted; see Params for why each has none.
	NoEffect []string
}

// levelRange is the compression-level range each method accepts.
var levelRange = map[string][2]int{
	"zstd": {0, 22}, "xz": {0, 9}, "bzip2": {1, 9}, "gzip": {0, 9}, "br": {0, 11}, "lz4": {1, 9},
}

const defaultThreshold = 100 << 20 // Nix's multipart-threshold default

// Parse parses a cache URL. Unknown or malformed parameters are errors that
// name the parameter.
func Parse(raw string) (*Cache, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("cache URL: %w", err)
	}
	c := &Cache{Scheme: u.Scheme, Compression: "zstd", CompressionLevel: -1, Priority: 40, WantMassQuery: true, Region: "us-east-1", Secure: true, PathStyle: "auto"}
	if err := c.parseLocation(u, raw); err != nil {
		return nil, err
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("cache URL query: %w", err)
	}
	s := &settings{c: c}
	for key, vals := range q {
		if err := s.read(key, vals); err != nil {
			return nil, err
		}
	}
	if err := s.resolve(); err != nil {
		return nil, err
	}
	slices.Sort(s.noEffect)
	c.NoEffect = s.noEffect
	return c, nil
}

// parseLocation reads where objects go: the part of the URL before its
// parameters.
func (c *Cache) parseLocation(u *url.URL, raw string) error {
	switch u.Scheme {
	case "s3":
		return c.parseS3Location(u, raw)
	case "http", "https":
		return c.parseHTTPLocation(u, raw)
	case "file":
		return c.parseFileLocation(u, raw)
	}
	return fmt.Errorf("cache URL %q: scheme must be s3://, http://, https:// or file://", raw)
}

func (c *Cache) parseS3Location(u *url.URL, raw string) error {
	if u.Host == "" {
		return fmt.Errorf("cache URL %q: no bucket (want s3://BUCKET?…)", raw)
	}
	if u.User != nil {
		return fmt.Errorf("cache URL: credentials do not belong in the URL; use the AWS credential chain")
	}
	c.Bucket = u.Host
	if p := strings.Trim(u.Path, "/"); p != "" {
		c.Prefix = p + "/"
	}
	return nil
}

func (c *Cache) parseHTTPLocation(u *url.URL, raw string) error {
	if u.Host == "" {
		return fmt.Errorf("cache URL %q: no host (want %s://HOST[:PORT][/PATH])", raw, u.Scheme)
	}
	if u.User != nil {
		return fmt.Errorf("cache URL: credentials do not belong in the URL; put them in a netrc file (agentd --netrc-file)")
	}
	if u.Fragment != "" {
		return fmt.Errorf("cache URL %q: a fragment (#…) has no meaning here", raw)
	}
	if err := checkHostPort(u.Host); err != nil {
		return fmt.Errorf("cache URL %q: %w", raw, err)
	}
	p := strings.TrimRight(u.EscapedPath(), "/")
	if strings.Contains(p+"/", "/../") || strings.Contains(p+"/", "/./") || strings.Contains(p, "//") {
		return fmt.Errorf("cache URL %q: the path must be clean (no //, . or ..)", raw)
	}
	c.URL = u.Scheme + "://" + u.Host + p
	c.Secure = u.Scheme == "https"
	return nil
}

func (c *Cache) parseFileLocation(u *url.URL, raw string) error {
	if u.Host != "" {
		return fmt.Errorf("cache URL %q: file URLs need an absolute path (file:///DIR)", raw)
	}
	if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
		return fmt.Errorf("cache URL %q: file URLs need a clean absolute path", raw)
	}
	c.Dir = u.Path
	return nil
}

// settings are what the parameters said, written into the Cache as they
// are read where they stand alone, kept here where they depend on each
// other until resolve.
type settings struct {
	c                      *Cache
	scheme, endpointScheme string // scheme= and the scheme of endpoint=
	chunk, bufferSize      uint64 // multipart-chunk-size=, buffer-size=
	threshold              *int64 // multipart-threshold=
	multipart, parallel    *bool  // multipart-upload=, parallel-compression=
	noEffect               []string
}

// resolve sets what depends on more than one parameter, in order.
func (s *settings) resolve() error {
	for _, step := range []func() error{
		s.resolveSecure, s.resolveAddressing, s.resolvePartSize, s.resolveMultipart,
		s.checkTLS, s.checkCompressionLevel, s.resolveParallel,
	} {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// resolveSecure: TLS as endpoint=http(s)://… or scheme= say.
func (s *settings) resolveSecure() error {
	switch {
	case s.endpointScheme != "" && s.scheme != "" && s.scheme != s.endpointScheme:
		return fmt.Errorf("cache URL: endpoint=%s://%s says %s but scheme=%s; drop scheme= or make them agree", s.endpointScheme, s.c.Endpoint, s.endpointScheme, s.scheme)
	case s.endpointScheme != "":
		s.c.Secure = s.endpointScheme == "https"
	case s.scheme != "":
		s.c.Secure = s.scheme == "https"
	}
	return nil
}

// resolveAddressing decides virtual-host or path-style requests for S3.
func (s *settings) resolveAddressing() error {
	c := s.c
	if c.Scheme != "s3" {
		return nil
	}
	dotted := strings.Contains(c.Bucket, ".")
	switch c.PathStyle {
	case "path":
		c.VirtualHost = false
	case "virtual":
		if dotted {
			return fmt.Errorf("cache URL: bucket name %q contains a dot, which virtual-host addressing cannot serve over TLS; use addressing-style=path or auto", c.Bucket)
		}
		c.VirtualHost = true
	default:
		// As Nix: virtual-host style for AWS, path style for a custom
		// endpoint, and path style for a dotted bucket name.
		c.VirtualHost = c.Endpoint == "" && !dotted
	}
	return nil
}

func (s *settings) resolvePartSize() error {
	if s.chunk != 0 && s.bufferSize != 0 && s.chunk != s.bufferSize {
		return fmt.Errorf("cache URL: multipart-chunk-size=%d and buffer-size=%d disagree (buffer-size is its old name)", s.chunk, s.bufferSize)
	}
	s.c.PartSize = max(s.chunk, s.bufferSize)
	return nil
}

// resolveMultipart: multipart-threshold only counts with
// multipart-upload=true, and multipart-upload=false changes nothing.
func (s *settings) resolveMultipart() error {
	if s.multipart != nil && *s.multipart {
		s.c.MultipartThreshold = defaultThreshold
		if s.threshold != nil {
			s.c.MultipartThreshold = *s.threshold
		}
		return nil
	}
	if s.multipart != nil {
		s.noEffect = append(s.noEffect, "multipart-upload")
	}
	if s.threshold != nil {
		s.noEffect = append(s.noEffect, "multipart-threshold")
	}
	return nil
}

func (s *settings) checkTLS() error {
	if s.c.TLSPrivateKey != "" && s.c.TLSCertificate == "" {
		return fmt.Errorf("cache URL: tls-private-key needs tls-certificate")
	}
	return nil
}

// checkCompressionLevel: the level must be in the method's range, and has
// no effect for a method without levels.
func (s *settings) checkCompressionLevel() error {
	c := s.c
	if c.CompressionLevel == -1 {
		return nil
	}
	r, ok := levelRange[c.Compression]
	if !ok {
		s.noEffect = append(s.noEffect, "compression-level")
		return nil
	}
	if c.CompressionLevel < r[0] || c.CompressionLevel > r[1] {
		return fmt.Errorf("cache URL parameter compression-level=%d: want %d to %d for compression=%s (or -1)", c.CompressionLevel, r[0], r[1], c.Compression)
	}
	return nil
}

// resolveParallel: zstd and lz4 compress a NAR on both cores unless told
// not to; the other methods are single-threaded here whatever is asked.
func (s *settings) resolveParallel() error {
	threaded := s.c.Compression == "zstd" || s.c.Compression == "lz4"
	s.c.ParallelCompression = threaded
	if s.parallel == nil {
		return nil
	}
	if threaded {
		s.c.ParallelCompression = *s.parallel
	} else if *s.parallel {
		s.noEffect = append(s.noEffect, "parallel-compression")
	}
	return nil
}

func storeName(scheme string) string {
	switch scheme {
	case "file":
		return "local (file://)"
	case "http", "https":
		return "HTTP"
	}
	return "S3"
}

// parseEndpoint reads endpoint=: a bare host[:port], or an http(s) URL
// whose scheme is returned.
func parseEndpoint(v string) (host, scheme string, err error) {
	if v == "" {
		return "", "", fmt.Errorf("empty")
	}
	if strings.Contains(v, "://") {
		u, err := url.Parse(v)
		if err != nil {
			return "", "", err
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return "", "", fmt.Errorf("want an http:// or https:// URL")
		}
		if u.User != nil {
			return "", "", fmt.Errorf("credentials do not belong in the URL; use the AWS credential chain")
		}
		if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return "", "", fmt.Errorf("a path in the endpoint is not supported; put the key prefix in the cache URL (s3://BUCKET/PREFIX?…)")
		}
		if err := checkHostPort(u.Host); err != nil {
			return "", "", err
		}
		return u.Host, u.Scheme, nil
	}
	if strings.ContainsAny(v, "/?#@") {
		return "", "", fmt.Errorf("want host[:port] or http(s)://host[:port]")
	}
	if err := checkHostPort(v); err != nil {
		return "", "", err
	}
	return v, "", nil
}

func checkHostPort(hp string) error {
	host, port := hp, ""
	if h, p, err := net.SplitHostPort(hp); err == nil {
		host, port = h, p
	} else if strings.Contains(strings.Trim(hp, "[]"), ":") && !strings.HasPrefix(hp, "[") {
		return fmt.Errorf("want host[:port] or http(s)://host[:port]")
	}
	if host == "" || strings.HasSuffix(hp, ":") {
		return fmt.Errorf("want host[:port] or http(s)://host[:port]")
	}
	if port != "" {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("port %q is not a port number", port)
		}
	}
	return nil
}

// parseSize reads a byte count with an optional K, M, G or T suffix
// (powers of 1024), as Nix reads its integer settings.
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	if s != "" {
		switch s[len(s)-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			s = s[:len(s)-1]
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, err
	}
	if n > (1<<64-1)/mult {
		return 0, fmt.Errorf("too large")
	}
	return n * mult, nil
}

// parseBool reads a boolean as Nix does.
func parseBool(s string) (bool, error) {
	switch s {
	case "1", "true", "yes":
		return true, nil
	case "0", "false", "no":
		return false, nil
	}
	return false, fmt.Errorf("not a boolean")
}

// Identity names the place objects go (endpoint, bucket and prefix, or the
// directory), without options or secrets. Two caches with the same identity
// hold the same objects.
func (c *Cache) Identity() string {
	switch c.Scheme {
	case "file":
		return "file://" + c.Dir
	case "http", "https":
		return c.URL + "/"
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
	switch c.Scheme {
	case "file":
		return "file://" + c.Dir
	case "http", "https":
		return c.URL
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
