// Package cacheurl parses binary cache addresses the way Nix users write
// them: s3://BUCKET[/PREFIX]?endpoint=…&region=…&…, http(s)://HOST[/PATH]?…
// or file:///ABS/DIR, with every parameter Nix's S3, HTTP and local binary
// cache stores accept.
//
// The parameters and what nixspool does with each are one table, Params:
// a parameter is honoured (it changes where or how objects are written),
// or accepted with no effect here (it only matters to Nix as a reader, or
// names a feature nixspool does not have) and then listed in
// Cache.NoEffect so that agentd and doctor can say so. Only a parameter
// Nix itself does not know for the store type is an error, and the error
// names it.
package cacheurl

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"regexp"
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

// Param is one cache URL parameter of Nix's binary cache stores.
type Param struct {
	Name string
	// Stores are the cache URL schemes whose Nix store knows it, as the
	// table in docs/configuration.md shows them: StoresS3, StoresS3HTTP or StoresAll.
	Stores string
	// Effect says what nixspool does with it (docs/configuration.md, "Cache URL parameters").
	Effect string
}

// The sets of stores a parameter applies to ("http" stands for https too).
const (
	StoresS3     = "s3"
	StoresS3HTTP = "s3, http"
	StoresAll    = "s3, http, file"
)

// AppliesTo reports whether Nix's store for the URL scheme knows p.
func (p Param) AppliesTo(scheme string) bool {
	switch scheme {
	case "s3":
		return true
	case "http", "https":
		return p.Stores != StoresS3
	}
	return p.Stores == StoresAll
}

// Params are the parameters Nix's S3, HTTP and local binary cache stores
// know (checked against Nix 2.8 and 2.35: BinaryCacheStoreConfig,
// HttpBinaryCacheStoreConfig, S3BinaryCacheStoreConfig and the StoreConfig
// settings every store has). Nix 2.35's HTTP store knows the metadata
// compressions and the TLS client certificate; nixspool accepts them for
// every http(s):// cache.
var Params = []Param{
	{"endpoint", StoresS3, "S3-compatible endpoint: `host[:port]` (TLS unless `scheme=http`) or `http(s)://host[:port]` (the URL's scheme decides TLS; a different `scheme=` is an error)"},
	{"region", StoresS3, "signing region (default `us-east-1`)"},
	{"aws-region", StoresS3, "old name of `region` (Nix ≤ 2.14)"},
	{"scheme", StoresS3, "`http` or `https` for a bare-host endpoint (deprecated in Nix for an endpoint URL)"},
	{"profile", StoresS3, "AWS profile in the shared config and credentials files, tried after the environment and SSO"},
	{"addressing-style", StoresS3, "`auto` (default: virtual-host style for AWS, path style for a custom endpoint or a bucket name with dots), `path` or `virtual`"},
	{"storage-class", StoresS3, "sent as `x-amz-storage-class` with every upload"},
	{"multipart-chunk-size", StoresS3, "smallest multipart part (5 MiB to 5 GiB; default 16 MiB); larger objects get larger parts to stay under 10,000 parts"},
	{"buffer-size", StoresS3, "old name of `multipart-chunk-size` (Nix ≤ 2.32)"},
	{"multipart-upload", StoresS3, "`true`: objects under `multipart-threshold` go up in one PUT; `false`: no effect (an object larger than one part always goes up in parts)"},
	{"multipart-threshold", StoresS3, "with `multipart-upload=true`, the size under which an object goes up in one PUT (default 100 MiB, at most 5 GiB); no effect otherwise"},
	{"narinfo-compression", StoresS3HTTP, "compress narinfos (`br`, `gzip` or `zstd`), sent as Content-Encoding"},
	{"ls-compression", StoresS3HTTP, "compress `.ls` listings, likewise"},
	{"log-compression", StoresS3HTTP, "compress build logs, likewise"},
	{"tls-certificate", StoresS3HTTP, "client certificate (PEM) presented to the endpoint"},
	{"tls-private-key", StoresS3HTTP, "key of `tls-certificate` (PEM; default: the certificate file)"},
	{"retry-attempts", StoresS3, "no effect: agentd retries each job with persisted backoff (`--max-attempts`, `--backoff-max`)"},
	{"retry-delay", StoresS3, "no effect, likewise"},
	{"retry-delay-rate-limited", StoresS3, "no effect, likewise"},
	{"retry-max-delay", StoresS3, "no effect, likewise"},
	{"compression", StoresAll, "NAR compression: `zstd` (default), `xz`, `bzip2`, `br`, `gzip`, `lz4` or `none`; refused: `lzip`, `lzop`, `compress`, `grzip`, `lrzip` (no maintained Go encoder) and `lzma` (stock Nix 2.8 cannot read it back)"},
	{"compression-level", StoresAll, "level of `compression` (zstd 0–22, xz 0–9, bzip2 1–9, gzip 0–9, br 0–11, lz4 1–9); no effect with `none`"},
	{"parallel-compression", StoresAll, "zstd and lz4 compress large NARs on two threads (Nix 2.35's default for zstd) unless `false`; with another method, `true` has no effect"},
	{"write-nar-listing", StoresAll, "also write `<hash>.ls` listings"},
	{"secret-key", StoresAll, "signing key file, in addition to `--secret-key-file` (same permission check)"},
	{"secret-keys", StoresAll, "comma-separated signing key files, likewise"},
	{"priority", StoresAll, "written to `nix-cache-info` (default 40)"},
	{"want-mass-query", StoresAll, "written to `nix-cache-info` (default true)"},
	{"store", StoresAll, "must be `/nix/store`, the only store nixspool uploads from"},
	{"index-debug-info", StoresAll, "no effect: `debuginfo/` objects are not written"},
	{"local-nar-cache", StoresAll, "no effect (a reader's setting)"},
	{"trusted", StoresAll, "no effect (a reader's setting)"},
	{"path-info-cache-size", StoresAll, "no effect (a reader's setting)"},
	{"system-features", StoresAll, "no effect (a builder's setting)"},
}

// WritableCompressions are the NAR compressions nixspool writes.
var WritableCompressions = []string{"zstd", "xz", "bzip2", "br", "gzip", "lz4", "none"}

// refusedCompressions are the other methods Nix accepts for compression=,
// each with why nixspool does not write it.
var refusedCompressions = map[string]string{
	"lzip":     "no maintained Go encoder",
	"lzop":     "no maintained Go encoder",
	"compress": "no maintained Go encoder",
	"grzip":    "no Go encoder",
	"lrzip":    "no Go encoder",
	"lzma":     "stock Nix 2.8 aborts reading it back, even what it wrote itself",
}

// levelRange is the compression-level range each method accepts.
var levelRange = map[string][2]int{
	"zstd": {0, 22}, "xz": {0, 9}, "bzip2": {1, 9}, "gzip": {0, 9}, "br": {0, 11}, "lz4": {1, 9},
}

const (
	minPartSize      = 5 << 20
	maxPartSize      = 5 << 30
	maxSinglePut     = 5 << 30
	defaultThreshold = 100 << 20 // Nix's multipart-threshold default
)

var storageClassRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

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
	case "http", "https":
		if u.Host == "" {
			return nil, fmt.Errorf("cache URL %q: no host (want %s://HOST[:PORT][/PATH])", raw, u.Scheme)
		}
		if u.User != nil {
			return nil, fmt.Errorf("cache URL: credentials do not belong in the URL; put them in a netrc file (agentd --netrc-file)")
		}
		if u.Fragment != "" {
			return nil, fmt.Errorf("cache URL %q: a fragment (#…) has no meaning here", raw)
		}
		if err := checkHostPort(u.Host); err != nil {
			return nil, fmt.Errorf("cache URL %q: %w", raw, err)
		}
		p := strings.TrimRight(u.EscapedPath(), "/")
		if strings.Contains(p+"/", "/../") || strings.Contains(p+"/", "/./") || strings.Contains(p, "//") {
			return nil, fmt.Errorf("cache URL %q: the path must be clean (no //, . or ..)", raw)
		}
		c.URL = u.Scheme + "://" + u.Host + p
		c.Secure = u.Scheme == "https"
	case "file":
		if u.Host != "" {
			return nil, fmt.Errorf("cache URL %q: file URLs need an absolute path (file:///DIR)", raw)
		}
		if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
			return nil, fmt.Errorf("cache URL %q: file URLs need a clean absolute path", raw)
		}
		c.Dir = u.Path
	default:
		return nil, fmt.Errorf("cache URL %q: scheme must be s3://, http://, https:// or file://", raw)
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, fmt.Errorf("cache URL query: %w", err)
	}
	known := map[string]Param{}
	for _, p := range Params {
		known[p.Name] = p
	}
	var (
		scheme, endpointScheme string
		chunk, bufferSize      uint64
		threshold              int64
		multipart, parallel    *bool
		noEffect               []string
	)
	for key, vals := range q {
		p, ok := known[key]
		if !ok {
			return nil, fmt.Errorf("cache URL parameter %q is not a setting of Nix's %s binary cache store", key, storeName(c.Scheme))
		}
		if len(vals) != 1 {
			return nil, fmt.Errorf("cache URL parameter %q given %d times", key, len(vals))
		}
		if !p.AppliesTo(c.Scheme) {
			if p.Stores == StoresS3HTTP {
				return nil, fmt.Errorf("cache URL parameter %q only applies to s3:// and http(s):// caches", key)
			}
			return nil, fmt.Errorf("cache URL parameter %q only applies to s3:// caches", key)
		}
		v := vals[0]
		bad := func(want string) error {
			return fmt.Errorf("cache URL parameter %s=%q: want %s", key, v, want)
		}
		switch key {
		case "endpoint":
			host, sch, err := parseEndpoint(v)
			if err != nil {
				return nil, fmt.Errorf("cache URL parameter endpoint=%q: %w", v, err)
			}
			c.Endpoint, endpointScheme = host, sch
		case "region", "aws-region":
			if v == "" {
				return nil, bad("a region name")
			}
			c.Region = v
		case "scheme":
			if v != "http" && v != "https" {
				return nil, bad("http or https")
			}
			scheme = v
		case "profile":
			c.Profile = v
		case "addressing-style":
			switch v {
			case "auto", "path", "virtual":
				c.PathStyle = v
			default:
				return nil, bad("auto, path or virtual")
			}
		case "storage-class":
			if v != "" && !storageClassRE.MatchString(v) {
				return nil, bad("a storage class name such as STANDARD_IA")
			}
			c.StorageClass = v
		case "multipart-chunk-size", "buffer-size":
			n, err := parseSize(v)
			if err != nil || n < minPartSize || n > maxPartSize {
				return nil, bad("a size from 5M to 5G (bytes, or with a K, M or G suffix)")
			}
			if key == "buffer-size" {
				bufferSize = n
			} else {
				chunk = n
			}
		case "multipart-threshold":
			n, err := parseSize(v)
			if err != nil || n > maxSinglePut {
				return nil, bad("a size up to 5G, the largest single PUT (bytes, or with a K, M or G suffix)")
			}
			threshold = int64(n)
		case "multipart-upload", "parallel-compression":
			b, err := parseBool(v)
			if err != nil {
				return nil, bad("true or false")
			}
			if key == "multipart-upload" {
				multipart = &b
			} else {
				parallel = &b
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
		case "tls-certificate", "tls-private-key", "local-nar-cache":
			if v != "" && !filepath.IsAbs(v) {
				return nil, bad("an absolute path")
			}
			switch key {
			case "tls-certificate":
				c.TLSCertificate = v
			case "tls-private-key":
				c.TLSPrivateKey = v
			default:
				noEffect = append(noEffect, key)
			}
		case "compression":
			switch {
			case slices.Contains(WritableCompressions, v):
				c.Compression = v
			case refusedCompressions[v] != "":
				return nil, fmt.Errorf("cache URL parameter compression=%s: not written by nixspool (%s); use one of %s", v, refusedCompressions[v], strings.Join(WritableCompressions, ", "))
			default:
				return nil, bad(strings.Join(WritableCompressions, ", "))
			}
		case "compression-level":
			n, err := strconv.Atoi(v)
			if err != nil || n < -1 {
				return nil, bad("an integer, -1 for the method's default")
			}
			c.CompressionLevel = n
		case "write-nar-listing", "want-mass-query", "trusted", "index-debug-info":
			b, err := parseBool(v)
			if err != nil {
				return nil, bad("true or false")
			}
			switch key {
			case "write-nar-listing":
				c.WriteNARListing = b
			case "want-mass-query":
				c.WantMassQuery = b
			default:
				noEffect = append(noEffect, key)
			}
		case "secret-key":
			if v != "" {
				if !filepath.IsAbs(v) {
					return nil, bad("an absolute path")
				}
				c.SecretKeyFiles = append([]string{v}, c.SecretKeyFiles...)
			}
		case "secret-keys":
			for _, f := range strings.Split(v, ",") {
				if f = strings.TrimSpace(f); f == "" {
					continue
				}
				if !filepath.IsAbs(f) {
					return nil, fmt.Errorf("cache URL parameter secret-keys: %q is not an absolute path", f)
				}
				c.SecretKeyFiles = append(c.SecretKeyFiles, f)
			}
		case "priority":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return nil, bad("a non-negative integer")
			}
			c.Priority = n
		case "store":
			if filepath.Clean(v) != "/nix/store" {
				return nil, bad("/nix/store, the only store nixspool uploads from")
			}
		case "path-info-cache-size":
			if _, err := strconv.Atoi(v); err != nil {
				return nil, bad("an integer")
			}
			noEffect = append(noEffect, key)
		case "retry-attempts", "retry-delay", "retry-delay-rate-limited", "retry-max-delay":
			if _, err := strconv.ParseUint(v, 10, 32); err != nil {
				return nil, bad("a non-negative integer")
			}
			noEffect = append(noEffect, key)
		case "system-features":
			noEffect = append(noEffect, key)
		default:
			// A parameter in Params without a case here is a bug.
			return nil, fmt.Errorf("cache URL parameter %q: not handled", key)
		}
	}

	// Settings that depend on each other.
	switch {
	case endpointScheme != "" && scheme != "" && scheme != endpointScheme:
		return nil, fmt.Errorf("cache URL: endpoint=%s://%s says %s but scheme=%s; drop scheme= or make them agree", endpointScheme, c.Endpoint, endpointScheme, scheme)
	case endpointScheme != "":
		c.Secure = endpointScheme == "https"
	case scheme != "":
		c.Secure = scheme == "https"
	}
	if c.Scheme == "s3" {
		dotted := strings.Contains(c.Bucket, ".")
		switch c.PathStyle {
		case "path":
			c.VirtualHost = false
		case "virtual":
			if dotted {
				return nil, fmt.Errorf("cache URL: bucket name %q contains a dot, which virtual-host addressing cannot serve over TLS; use addressing-style=path or auto", c.Bucket)
			}
			c.VirtualHost = true
		default:
			// As Nix: virtual-host style for AWS, path style for a custom
			// endpoint, and path style for a dotted bucket name.
			c.VirtualHost = c.Endpoint == "" && !dotted
		}
	}
	if chunk != 0 && bufferSize != 0 && chunk != bufferSize {
		return nil, fmt.Errorf("cache URL: multipart-chunk-size=%d and buffer-size=%d disagree (buffer-size is its old name)", chunk, bufferSize)
	}
	c.PartSize = max(chunk, bufferSize)
	if multipart != nil && *multipart {
		c.MultipartThreshold = defaultThreshold
		if q.Has("multipart-threshold") {
			c.MultipartThreshold = threshold
		}
	} else {
		if multipart != nil {
			noEffect = append(noEffect, "multipart-upload")
		}
		if q.Has("multipart-threshold") {
			noEffect = append(noEffect, "multipart-threshold")
		}
	}
	if c.TLSPrivateKey != "" && c.TLSCertificate == "" {
		return nil, fmt.Errorf("cache URL: tls-private-key needs tls-certificate")
	}
	if c.CompressionLevel != -1 {
		if r, ok := levelRange[c.Compression]; !ok {
			noEffect = append(noEffect, "compression-level")
		} else if c.CompressionLevel < r[0] || c.CompressionLevel > r[1] {
			return nil, fmt.Errorf("cache URL parameter compression-level=%d: want %d to %d for compression=%s (or -1)", c.CompressionLevel, r[0], r[1], c.Compression)
		}
	}
	// zstd and lz4 compress a NAR on both cores unless told not to; the
	// other methods are single-threaded here whatever is asked.
	threaded := c.Compression == "zstd" || c.Compression == "lz4"
	c.ParallelCompression = threaded
	if parallel != nil {
		if threaded {
			c.ParallelCompression = *parallel
		} else if *parallel {
			noEffect = append(noEffect, "parallel-compression")
		}
	}
	slices.Sort(noEffect)
	c.NoEffect = noEffect
	return c, nil
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
