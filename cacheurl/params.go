package cacheurl

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Param is one cache URL parameter of Nix's binary cache stores.
type Param struct {
	Name string
	// Stores are the cache URL schemes whose Nix store knows it, as the
	// table in docs/configuration.md shows them: StoresS3, StoresS3HTTP or StoresAll.
	Stores string
	// Effect says what nixspool does with it (docs/configuration.md, "Cache URL parameters").
	Effect string
	// parse checks a value and records it in the settings being read
	// (a field of the Cache, a setting resolved with others, or the
	// parameter's name among those with no effect).
	parse parseFunc
}

// parseFunc reads the value v of the parameter key. A malformed value is
// a want error, which Parse turns into one naming the parameter.
type parseFunc func(s *settings, key, v string) error

// want is the error of a malformed value: what the parameter takes.
type want string

func (w want) Error() string { return "want " + string(w) }

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
// settings every store has), each with how Parse reads it. Nix 2.35's HTTP
// store knows the metadata compressions and the TLS client certificate;
// nixspool accepts them for every http(s):// cache.
var Params = []Param{
	{"endpoint", StoresS3, "S3-compatible endpoint: `host[:port]` (TLS unless `scheme=http`) or `http(s)://host[:port]` (the URL's scheme decides TLS; a different `scheme=` is an error)", parseEndpointParam},
	{"region", StoresS3, "signing region (default `us-east-1`)", parseRegion},
	{"aws-region", StoresS3, "old name of `region` (Nix ≤ 2.14)", parseRegion},
	{"scheme", StoresS3, "`http` or `https` for a bare-host endpoint (deprecated in Nix for an endpoint URL)", parseScheme},
	{"profile", StoresS3, "AWS profile in the shared config and credentials files, tried after the environment and SSO", parseProfile},
	{"addressing-style", StoresS3, "`auto` (default: virtual-host style for AWS, path style for a custom endpoint or a bucket name with dots), `path` or `virtual`", parseAddressingStyle},
	{"storage-class", StoresS3, "sent as `x-amz-storage-class` with every upload", parseStorageClass},
	{"multipart-chunk-size", StoresS3, "smallest multipart part (5 MiB to 5 GiB; default 16 MiB); larger objects get larger parts to stay under 10,000 parts", partSize(func(s *settings) *uint64 { return &s.chunk })},
	{"buffer-size", StoresS3, "old name of `multipart-chunk-size` (Nix ≤ 2.32)", partSize(func(s *settings) *uint64 { return &s.bufferSize })},
	{"multipart-upload", StoresS3, "`true`: objects under `multipart-threshold` go up in one PUT; `false`: no effect (an object larger than one part always goes up in parts)", boolean(func(s *settings, b bool) { s.multipart = &b })},
	{"multipart-threshold", StoresS3, "with `multipart-upload=true`, the size under which an object goes up in one PUT (default 100 MiB, at most 5 GiB); no effect otherwise", parseThreshold},
	{"narinfo-compression", StoresS3HTTP, "compress narinfos (`br`, `gzip` or `zstd`), sent as Content-Encoding", metaCompression(func(c *Cache) *string { return &c.NarinfoCompression })},
	{"ls-compression", StoresS3HTTP, "compress `.ls` listings, likewise", metaCompression(func(c *Cache) *string { return &c.LsCompression })},
	{"log-compression", StoresS3HTTP, "compress build logs, likewise", metaCompression(func(c *Cache) *string { return &c.LogCompression })},
	{"tls-certificate", StoresS3HTTP, "client certificate (PEM) presented to the endpoint", absPath(func(c *Cache) *string { return &c.TLSCertificate })},
	{"tls-private-key", StoresS3HTTP, "key of `tls-certificate` (PEM; default: the certificate file)", absPath(func(c *Cache) *string { return &c.TLSPrivateKey })},
	{"retry-attempts", StoresS3, "no effect: agentd retries each job with persisted backoff (`--max-attempts`, `--backoff-max`)", noEffect(checkUint32)},
	{"retry-delay", StoresS3, "no effect, likewise", noEffect(checkUint32)},
	{"retry-delay-rate-limited", StoresS3, "no effect, likewise", noEffect(checkUint32)},
	{"retry-max-delay", StoresS3, "no effect, likewise", noEffect(checkUint32)},
	{"compression", StoresAll, "NAR compression: `zstd` (default), `xz`, `bzip2`, `br`, `gzip`, `lz4` or `none`; refused: `lzip`, `lzop`, `compress`, `grzip`, `lrzip` (no maintained Go encoder) and `lzma` (stock Nix 2.8 cannot read it back)", parseCompression},
	{"compression-level", StoresAll, "level of `compression` (zstd 0–22, xz 0–9, bzip2 1–9, gzip 0–9, br 0–11, lz4 1–9); no effect with `none`", parseCompressionLevel},
	{"parallel-compression", StoresAll, "zstd and lz4 compress large NARs on two threads (Nix 2.35's default for zstd) unless `false`; with another method, `true` has no effect", boolean(func(s *settings, b bool) { s.parallel = &b })},
	{"write-nar-listing", StoresAll, "also write `<hash>.ls` listings", boolean(func(s *settings, b bool) { s.c.WriteNARListing = b })},
	{"secret-key", StoresAll, "signing key file, in addition to `--secret-key-file` (same permission check)", parseSecretKey},
	{"secret-keys", StoresAll, "comma-separated signing key files, likewise", parseSecretKeys},
	{"priority", StoresAll, "written to `nix-cache-info` (default 40)", parsePriority},
	{"want-mass-query", StoresAll, "written to `nix-cache-info` (default true)", boolean(func(s *settings, b bool) { s.c.WantMassQuery = b })},
	{"store", StoresAll, "must be `/nix/store`, the only store nixspool uploads from", parseStore},
	{"index-debug-info", StoresAll, "no effect: `debuginfo/` objects are not written", noEffect(checkBool)},
	{"local-nar-cache", StoresAll, "no effect (a reader's setting)", noEffect(checkAbsPath)},
	{"trusted", StoresAll, "no effect (a reader's setting)", noEffect(checkBool)},
	{"path-info-cache-size", StoresAll, "no effect (a reader's setting)", noEffect(checkInt)},
	{"system-features", StoresAll, "no effect (a builder's setting)", noEffect(func(string) error { return nil })},
}

// param finds a parameter by name.
func param(name string) (Param, bool) {
	i := slices.IndexFunc(Params, func(p Param) bool { return p.Name == name })
	if i < 0 {
		return Param{}, false
	}
	return Params[i], true
}

// read checks that key may be given for the cache's scheme and reads its
// values into s.
func (s *settings) read(key string, vals []string) error {
	p, ok := param(key)
	if !ok {
		return fmt.Errorf("cache URL parameter %q is not a setting of Nix's %s binary cache store", key, storeName(s.c.Scheme))
	}
	if len(vals) != 1 {
		return fmt.Errorf("cache URL parameter %q given %d times", key, len(vals))
	}
	if !p.AppliesTo(s.c.Scheme) {
		if p.Stores == StoresS3HTTP {
			return fmt.Errorf("cache URL parameter %q only applies to s3:// and http(s):// caches", key)
		}
		return fmt.Errorf("cache URL parameter %q only applies to s3:// caches", key)
	}
	if p.parse == nil {
		// A parameter in Params without a parse func is a bug.
		return fmt.Errorf("cache URL parameter %q: not handled", key)
	}
	v := vals[0]
	err := p.parse(s, key, v)
	var w want
	if errors.As(err, &w) {
		return fmt.Errorf("cache URL parameter %s=%q: %w", key, v, err)
	}
	return err
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

const (
	minPartSize  = 5 << 20
	maxPartSize  = 5 << 30
	maxSinglePut = 5 << 30
)

var storageClassRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

func parseEndpointParam(s *settings, _, v string) error {
	host, sch, err := parseEndpoint(v)
	if err != nil {
		return fmt.Errorf("cache URL parameter endpoint=%q: %w", v, err)
	}
	s.c.Endpoint, s.endpointScheme = host, sch
	return nil
}

func parseRegion(s *settings, _, v string) error {
	if v == "" {
		return want("a region name")
	}
	s.c.Region = v
	return nil
}

func parseScheme(s *settings, _, v string) error {
	if v != "http" && v != "https" {
		return want("http or https")
	}
	s.scheme = v
	return nil
}

func parseProfile(s *settings, _, v string) error {
	s.c.Profile = v
	return nil
}

func parseAddressingStyle(s *settings, _, v string) error {
	switch v {
	case "auto", "path", "virtual":
		s.c.PathStyle = v
		return nil
	}
	return want("auto, path or virtual")
}

func parseStorageClass(s *settings, _, v string) error {
	if v != "" && !storageClassRE.MatchString(v) {
		return want("a storage class name such as STANDARD_IA")
	}
	s.c.StorageClass = v
	return nil
}

// partSize reads a multipart part size into the setting field returns.
func partSize(field func(*settings) *uint64) parseFunc {
	return func(s *settings, _, v string) error {
		n, err := parseSize(v)
		if err != nil || n < minPartSize || n > maxPartSize {
			return want("a size from 5M to 5G (bytes, or with a K, M or G suffix)")
		}
		*field(s) = n
		return nil
	}
}

func parseThreshold(s *settings, _, v string) error {
	n, err := parseSize(v)
	if err != nil || n > maxSinglePut {
		return want("a size up to 5G, the largest single PUT (bytes, or with a K, M or G suffix)")
	}
	t := int64(n)
	s.threshold = &t
	return nil
}

// boolean reads a boolean and hands it to set.
func boolean(set func(*settings, bool)) parseFunc {
	return func(s *settings, _, v string) error {
		b, err := parseBool(v)
		if err != nil {
			return want("true or false")
		}
		set(s, b)
		return nil
	}
}

// metaCompression reads the compression of one kind of metadata object
// into the Cache field returns.
func metaCompression(field func(*Cache) *string) parseFunc {
	return func(s *settings, _, v string) error {
		switch v {
		case "", "br", "gzip", "zstd":
			*field(s.c) = v
			return nil
		}
		return want("br, gzip or zstd (what every Nix reader decodes)")
	}
}

// absPath reads an absolute path ("" for none) into the Cache field
// returns.
func absPath(field func(*Cache) *string) parseFunc {
	return func(s *settings, _, v string) error {
		if err := checkAbsPath(v); err != nil {
			return err
		}
		*field(s.c) = v
		return nil
	}
}

// noEffect checks a value with check and lists the parameter among those
// with no effect.
func noEffect(check func(string) error) parseFunc {
	return func(s *settings, key, v string) error {
		if err := check(v); err != nil {
			return err
		}
		s.noEffect = append(s.noEffect, key)
		return nil
	}
}

func checkAbsPath(v string) error {
	if v != "" && !filepath.IsAbs(v) {
		return want("an absolute path")
	}
	return nil
}

func checkBool(v string) error {
	if _, err := parseBool(v); err != nil {
		return want("true or false")
	}
	return nil
}

func checkInt(v string) error {
	if _, err := strconv.Atoi(v); err != nil {
		return want("an integer")
	}
	return nil
}

func checkUint32(v string) error {
	if _, err := strconv.ParseUint(v, 10, 32); err != nil {
		return want("a non-negative integer")
	}
	return nil
}

func parseCompression(s *settings, _, v string) error {
	switch {
	case slices.Contains(WritableCompressions, v):
		s.c.Compression = v
		return nil
	case refusedCompressions[v] != "":
		return fmt.Errorf("cache URL parameter compression=%s: not written by nixspool (%s); use one of %s", v, refusedCompressions[v], strings.Join(WritableCompressions, ", "))
	}
	return want(strings.Join(WritableCompressions, ", "))
}

func parseCompressionLevel(s *settings, _, v string) error {
	n, err := strconv.Atoi(v)
	if err != nil || n < -1 {
		return want("an integer, -1 for the method's default")
	}
	s.c.CompressionLevel = n
	return nil
}

// parseSecretKey puts secret-key= first among the signing keys, whatever
// the order of the parameters.
func parseSecretKey(s *settings, _, v string) error {
	if v == "" {
		return nil
	}
	if err := checkAbsPath(v); err != nil {
		return err
	}
	s.c.SecretKeyFiles = append([]string{v}, s.c.SecretKeyFiles...)
	return nil
}

func parseSecretKeys(s *settings, _, v string) error {
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		if !filepath.IsAbs(f) {
			return fmt.Errorf("cache URL parameter secret-keys: %q is not an absolute path", f)
		}
		s.c.SecretKeyFiles = append(s.c.SecretKeyFiles, f)
	}
	return nil
}

func parsePriority(s *settings, _, v string) error {
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return want("a non-negative integer")
	}
	s.c.Priority = n
	return nil
}

func parseStore(_ *settings, _, v string) error {
	if filepath.Clean(v) != "/nix/store" {
		return want("/nix/store, the only store nixspool uploads from")
	}
	return nil
}
