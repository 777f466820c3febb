package cacheurl

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	c, err := Parse("s3://nix-cache?endpoint=127.0.0.1:9000&region=eu-west-1&scheme=http&profile=ci&compression=xz&write-nar-listing=1&narinfo-compression=br&priority=30&want-mass-query=false&addressing-style=path")
	if err != nil {
		t.Fatal(err)
	}
	if c.Bucket != "nix-cache" || c.Endpoint != "127.0.0.1:9000" || c.Region != "eu-west-1" || c.Secure || c.Profile != "ci" ||
		c.Compression != "xz" || !c.WriteNARListing || c.NarinfoCompression != "br" || c.Priority != 30 || c.WantMassQuery || c.PathStyle != "path" || c.VirtualHost {
		t.Fatalf("parsed %+v", c)
	}
	d, err := Parse("s3://b")
	if err != nil || !d.Secure || d.Compression != "zstd" || d.Priority != 40 || !d.WantMassQuery || !d.VirtualHost || d.PartSize != 0 || d.MultipartThreshold != 0 || len(d.NoEffect) != 0 {
		t.Fatalf("defaults: %+v %v", d, err)
	}
	f, err := Parse("file:///var/cache/nix?compression=none")
	if err != nil || f.Dir != "/var/cache/nix" || f.Compression != "none" {
		t.Fatalf("file: %+v %v", f, err)
	}
	if c.Identity() == d.Identity() {
		t.Fatal("different endpoints share an identity")
	}
}

// sample is a valid value for every parameter in Params.
var sample = map[string]string{
	"endpoint": "minio.example.org:9000", "region": "eu-west-1", "aws-region": "eu-west-1", "scheme": "http",
	"profile": "ci", "addressing-style": "path", "storage-class": "STANDARD_IA", "multipart-chunk-size": "8M",
	"buffer-size": "8388608", "multipart-upload": "true", "multipart-threshold": "64M",
	"narinfo-compression": "br", "ls-compression": "gzip", "log-compression": "zstd",
	"tls-certificate": "/etc/nixspool/client.pem", "tls-private-key": "/etc/nixspool/client.key",
	"retry-attempts": "5", "retry-delay": "250", "retry-delay-rate-limited": "5000", "retry-max-delay": "60000",
	"compression": "xz", "compression-level": "6", "parallel-compression": "true", "write-nar-listing": "1",
	"secret-key": "/etc/nix/cache.key", "secret-keys": "/etc/nix/a.key,/etc/nix/b.key", "priority": "30",
	"want-mass-query": "yes", "store": "/nix/store", "index-debug-info": "true", "local-nar-cache": "/var/cache/nars",
	"trusted": "1", "path-info-cache-size": "1000", "system-features": "kvm big-parallel",
}

// TestEveryParameterIsAccepted: each parameter Nix knows parses alone; one
// that Nix's file:// or HTTP store does not know is refused there, naming
// it.
func TestEveryParameterIsAccepted(t *testing.T) {
	for _, p := range Params {
		v, ok := sample[p.Name]
		if !ok {
			t.Errorf("no sample value for %s", p.Name)
			continue
		}
		q := "?" + p.Name + "=" + v
		companion := ""
		if p.Name == "tls-private-key" {
			companion = "&tls-certificate=/etc/nixspool/client.pem"
		}
		if _, err := Parse("s3://bucket" + q + companion); err != nil {
			t.Errorf("s3: %s=%s: %v", p.Name, v, err)
		}
		for _, base := range []string{"file:///var/cache/nix", "http://cache.example.org/nix", "https://cache.example.org"} {
			scheme, _, _ := strings.Cut(base, ":")
			known := p.AppliesTo(scheme)
			with := ""
			if known {
				with = companion
			}
			_, err := Parse(base + q + with)
			switch {
			case !known && (err == nil || !strings.Contains(err.Error(), p.Name)):
				t.Errorf("%s: %s accepted or error does not name it: %v", scheme, p.Name, err)
			case known && err != nil:
				t.Errorf("%s: %s=%s: %v", scheme, p.Name, v, err)
			}
		}
	}
	for name := range sample {
		if !slices.ContainsFunc(Params, func(p Param) bool { return p.Name == name }) {
			t.Errorf("sample %s is not a parameter", name)
		}
	}
}

// TestHTTP: an http(s):// cache is its URL without parameters, TLS
// unless http://, with the binary cache parameters Nix's HTTP store knows.
func TestHTTP(t *testing.T) {
	c, err := Parse("http://127.0.0.1:8080/cache/?compression=xz&secret-key=/k/one&narinfo-compression=br&write-nar-listing=1&priority=30")
	if err != nil {
		t.Fatal(err)
	}
	if c.Scheme != "http" || c.URL != "http://127.0.0.1:8080/cache" || c.Secure || c.Compression != "xz" || c.NarinfoCompression != "br" ||
		!c.WriteNARListing || c.Priority != 30 || !slices.Equal(c.SecretKeyFiles, []string{"/k/one"}) {
		t.Fatalf("parsed %+v", c)
	}
	if c.String() != "http://127.0.0.1:8080/cache" || c.Identity() != "http://127.0.0.1:8080/cache/" {
		t.Errorf("String %q, Identity %q", c.String(), c.Identity())
	}
	s, err := Parse("https://cache.example.org")
	if err != nil || !s.Secure || s.URL != "https://cache.example.org" || s.Compression != "zstd" {
		t.Fatalf("https: %+v %v", s, err)
	}
	for raw, want := range map[string]string{
		"http://user:secret@cache.example.org/": "netrc",
		"https:///nix":                          "no host",
		"http://h/a/../b":                       "clean",
		"http://h/a//b":                         "clean",
		"http://h/#x":                           "fragment",
		"https://h?region=eu-west-1":            "region",
		"https://h?endpoint=x":                  "only applies to s3://",
		"https://h?bogus=1":                     "HTTP binary cache store",
	} {
		_, err := Parse(raw)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an error saying %q", raw, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("Parse(%q) error shows the password: %v", raw, err)
		}
	}
}

func TestHonouredParameters(t *testing.T) {
	c, err := Parse("s3://b/pre/fix?storage-class=GLACIER_IR&multipart-chunk-size=32M&multipart-upload=true&multipart-threshold=1G" +
		"&secret-key=/k/one&secret-keys=/k/two,,/k/three&tls-certificate=/t/cert.pem&compression=lz4&compression-level=9&parallel-compression=1&store=/nix/store/")
	if err != nil {
		t.Fatal(err)
	}
	if c.Prefix != "pre/fix/" || c.StorageClass != "GLACIER_IR" || c.PartSize != 32<<20 || c.MultipartThreshold != 1<<30 ||
		c.TLSCertificate != "/t/cert.pem" || c.Compression != "lz4" || c.CompressionLevel != 9 || !c.ParallelCompression || len(c.NoEffect) != 0 {
		t.Fatalf("parsed %+v", c)
	}
	if want := []string{"/k/one", "/k/two", "/k/three"}; !slices.Equal(c.SecretKeyFiles, want) {
		t.Errorf("SecretKeyFiles = %v, want %v", c.SecretKeyFiles, want)
	}
	// multipart-upload=true without a threshold: Nix's 100 MiB.
	c, _ = Parse("s3://b?multipart-upload=yes&buffer-size=5242880")
	if c.MultipartThreshold != 100<<20 || c.PartSize != 5<<20 {
		t.Errorf("threshold %d, part size %d", c.MultipartThreshold, c.PartSize)
	}
	// Same size under both names is fine.
	if _, err := Parse("s3://b?buffer-size=8M&multipart-chunk-size=8388608"); err != nil {
		t.Error(err)
	}
	for _, comp := range WritableCompressions {
		if c, err := Parse("file:///c?compression=" + comp); err != nil || c.Compression != comp {
			t.Errorf("compression=%s: %v", comp, err)
		}
	}
	if c, _ := Parse("s3://b?compression=xz"); c.ParallelCompression {
		t.Error("parallel compression on for xz")
	}
}

func TestNoEffect(t *testing.T) {
	c, err := Parse("s3://b?index-debug-info=true&trusted=1&local-nar-cache=/x&path-info-cache-size=9&system-features=kvm" +
		"&retry-attempts=3&retry-delay=1&retry-delay-rate-limited=1&retry-max-delay=1&multipart-threshold=200M&compression=none&compression-level=3")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"compression-level", "index-debug-info", "local-nar-cache", "multipart-threshold", "path-info-cache-size",
		"retry-attempts", "retry-delay", "retry-delay-rate-limited", "retry-max-delay", "system-features", "trusted"}
	if !slices.Equal(c.NoEffect, want) {
		t.Errorf("NoEffect = %v\n want %v", c.NoEffect, want)
	}
	for raw, want := range map[string][]string{
		"s3://b?multipart-upload=false":                    {"multipart-upload"},
		"s3://b?parallel-compression=false":                nil, // honoured: one thread
		"s3://b?compression=xz&parallel-compression=1":     {"parallel-compression"},
		"s3://b?compression=zstd&parallel-compression=1":   nil,
		"s3://b?multipart-upload=1&multipart-threshold=6M": nil,
	} {
		c, err := Parse(raw)
		if err != nil || !slices.Equal(c.NoEffect, want) {
			t.Errorf("Parse(%q).NoEffect = %v, %v; want %v", raw, c.NoEffect, err, want)
		}
	}
}

// TestEndpointForms: where requests go for each way of writing the
// endpoint, as Nix decides it (s3-url.cc, ParsedS3URL::toHttpsUrl).
func TestEndpointForms(t *testing.T) {
	for _, tc := range []struct {
		url      string
		endpoint string
		secure   bool
		virtual  bool
		prefix   string
	}{
		{"s3://b", "", true, true, ""},                                // AWS: virtual host
		{"s3://b?addressing-style=path", "", true, false, ""},         // AWS, told path
		{"s3://my.bucket", "", true, false, ""},                       // dotted: path under auto
		{"s3://b?endpoint=minio:9000", "minio:9000", true, false, ""}, // bare host: https, path style
		{"s3://b?endpoint=minio:9000&scheme=http", "minio:9000", false, false, ""},
		{"s3://b?endpoint=http://127.0.0.1:9000", "127.0.0.1:9000", false, false, ""},
		{"s3://b?endpoint=https://s3.example.org/", "s3.example.org", true, false, ""},
		{"s3://b?endpoint=http://minio:9000&scheme=http", "minio:9000", false, false, ""},
		{"s3://b?endpoint=https://r2.example&addressing-style=virtual", "r2.example", true, true, ""},
		{"s3://b?endpoint=[::1]:9000&scheme=http", "[::1]:9000", false, false, ""},
		{"s3://b?endpoint=http://[::1]:9000", "[::1]:9000", false, false, ""},
		// The two forms of the "Setting up a Nix binary cache" guide.
		{"s3://cache?endpoint=demo-store.ams3.digitaloceanspaces.com", "demo-store.ams3.digitaloceanspaces.com", true, false, ""},
		{"s3://demo-store/cache?endpoint=s3.eu-central-003.backblazeb2.com", "s3.eu-central-003.backblazeb2.com", true, false, "cache/"},
	} {
		c, err := Parse(tc.url)
		if err != nil {
			t.Errorf("%s: %v", tc.url, err)
			continue
		}
		if c.Endpoint != tc.endpoint || c.Secure != tc.secure || c.VirtualHost != tc.virtual || c.Prefix != tc.prefix {
			t.Errorf("%s: endpoint %q secure %v virtual %v prefix %q; want %q %v %v %q", tc.url, c.Endpoint, c.Secure, c.VirtualHost, c.Prefix,
				tc.endpoint, tc.secure, tc.virtual, tc.prefix)
		}
	}
}

func TestParseErrorsNameTheParameter(t *testing.T) {
	for raw, want := range map[string]string{
		"s3://b?compresion=zstd":                         "compresion",
		"s3://b?real=/x":                                 `"real"`,
		"s3://b?versionId=3":                             "versionId",
		"s3://b?compression=lz5":                         "compression",
		"s3://b?compression=lzop":                        "no maintained Go encoder",
		"s3://b?compression=lzma":                        "aborts reading it back",
		"s3://b?compression=lzip":                        "zstd, xz, bzip2, br, gzip, lz4, none",
		"s3://b?scheme=ftp":                              "scheme",
		"s3://b?endpoint=http://h:1&scheme=https":        "scheme=https",
		"s3://b?endpoint=ftp://h":                        "endpoint",
		"s3://b?endpoint=https://h/prefix":               "path in the endpoint",
		"s3://b?endpoint=https://u:p@h":                  "credentials",
		"s3://b?endpoint=h/x":                            "endpoint",
		"s3://b?endpoint=h:port":                         "port",
		"s3://b?endpoint=h:":                             "endpoint",
		"s3://b?endpoint=":                               "endpoint",
		"s3://my.bucket?addressing-style=virtual":        "contains a dot",
		"s3://b?addressing-style=dns":                    "addressing-style",
		"s3://b?narinfo-compression=xz":                  "narinfo-compression",
		"s3://b?priority=-1":                             "priority",
		"s3://b?compression-level=99":                    "compression-level",
		"s3://b?compression=gzip&compression-level=10":   "0 to 9",
		"s3://b?compression-level=-2":                    "compression-level",
		"file:///d?endpoint=x":                           "endpoint",
		"s3://b?region=a&region=b":                       "region",
		"s3://b?write-nar-listing=maybe":                 "write-nar-listing",
		"s3://b?multipart-chunk-size=4M":                 "multipart-chunk-size",
		"s3://b?multipart-chunk-size=6G":                 "multipart-chunk-size",
		"s3://b?buffer-size=lots":                        "buffer-size",
		"s3://b?buffer-size=8M&multipart-chunk-size=16M": "disagree",
		"s3://b?multipart-threshold=6G":                  "multipart-threshold",
		"s3://b?multipart-upload=sometimes":              "multipart-upload",
		"s3://b?storage-class=STANDARD%20IA":             "storage-class",
		"s3://b?secret-key=relative.key":                 "secret-key",
		"s3://b?secret-keys=/a.key,b.key":                "secret-keys",
		"s3://b?tls-private-key=/k.pem":                  "tls-certificate",
		"s3://b?tls-certificate=cert.pem":                "tls-certificate",
		"s3://b?store=/gnu/store":                        "store",
		"s3://b?trusted=perhaps":                         "trusted",
		"s3://b?retry-attempts=-1":                       "retry-attempts",
		"s3://b?path-info-cache-size=big":                "path-info-cache-size",
		"ftp://example.com/cache":                        "scheme",
		"file://relative/dir":                            "absolute",
		"s3://?endpoint=x":                               "bucket",
		"s3://key:secret@bucket":                         "credentials",
		"file:///a/../b":                                 "clean",
	} {
		_, err := Parse(raw)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an error mentioning %q", raw, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Errorf("Parse(%q): error is not one line: %q", raw, err)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "5242880": 5 << 20, "5M": 5 << 20, "5m": 5 << 20, "64k": 64 << 10, "2G": 2 << 30, "1T": 1 << 40} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "5X", "-1", "99999999999999999999", "20000000T"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}

func TestStringHasNoSecrets(t *testing.T) {
	c, _ := Parse("s3://b/pre?endpoint=h:1&scheme=http&secret-key=/etc/nix/k")
	if got := c.String(); got != "s3://b/pre?endpoint=h%3A1&region=us-east-1&scheme=http" {
		t.Fatalf("String = %q", got)
	}
	c, _ = Parse("s3://b?endpoint=http://h:1")
	if got := c.String(); got != "s3://b?endpoint=h%3A1&region=us-east-1&scheme=http" {
		t.Fatalf("String = %q", got)
	}
}

// TestDocsListEveryParameter: the table of cache URL parameters in
// docs/configuration.md ("Cache URL parameters") has exactly one row per
// parameter the parser knows.
func TestDocsListEveryParameter(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "docs", "configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	heading := regexp.MustCompile(`(?m)^#{2,3} Cache URL parameters\n`).FindStringIndex(text)
	if heading == nil {
		t.Fatal("docs/configuration.md has no \"## Cache URL parameters\" section")
	}
	section := text[heading[1]:]
	if end := strings.Index(section, "\n#"); end >= 0 {
		section = section[:end]
	}
	row := regexp.MustCompile("(?m)^\\| `([a-z0-9-]+)` \\| ([a-z0-9, ]+) \\| (.*) \\|$")
	var listed []string
	for _, m := range row.FindAllStringSubmatch(section, -1) {
		listed = append(listed, m[1])
		for _, p := range Params {
			if p.Name != m[1] {
				continue
			}
			stores := p.Stores
			if m[2] != stores || m[3] != p.Effect {
				t.Errorf("docs/configuration.md row for %s says\n  %s | %s\nthe code says\n  %s | %s", p.Name, m[2], m[3], stores, p.Effect)
			}
		}
	}
	for _, p := range Params {
		if n := strings.Count(" "+strings.Join(listed, " ")+" ", " "+p.Name+" "); n != 1 {
			t.Errorf("docs/configuration.md lists %s %d times, want once", p.Name, n)
		}
	}
	for _, name := range listed {
		if !slices.ContainsFunc(Params, func(p Param) bool { return p.Name == name }) {
			t.Errorf("docs/configuration.md lists %s, which the parser does not know", name)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"s3://b?endpoint=h:1&scheme=http", "file:///x", "http://h:8080/c?compression=xz", "https://u:p@h/", "s3://b/p?compression=xz&priority=1", "%zz", "s3://b?a=b&a=c",
		"s3://b?endpoint=http://[::1]:9&multipart-chunk-size=5M", "s3://a.b?addressing-style=virtual"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		c, err := Parse(raw)
		if err != nil {
			if strings.Contains(err.Error(), "not handled") {
				t.Fatal(err)
			}
			return
		}
		if c.Scheme != "s3" && c.Scheme != "file" && c.Scheme != "http" && c.Scheme != "https" {
			t.Fatalf("accepted scheme %q", c.Scheme)
		}
		if c.PartSize != 0 && (c.PartSize < 5<<20 || c.PartSize > 5<<30) {
			t.Fatalf("part size %d", c.PartSize)
		}
		_ = c.String()
		_ = c.Identity()
	})
}

// TestParamsTable: every parameter is declared once, with the stores that
// know it, a parse func and the effect text docs/configuration.md shows.
func TestParamsTable(t *testing.T) {
	seen := map[string]bool{}
	for _, p := range Params {
		if seen[p.Name] {
			t.Errorf("%s declared twice", p.Name)
		}
		seen[p.Name] = true
		if p.parse == nil {
			t.Errorf("%s has no parse func", p.Name)
		}
		if p.Effect == "" {
			t.Errorf("%s has no effect text", p.Name)
		}
		if p.Stores != StoresS3 && p.Stores != StoresS3HTTP && p.Stores != StoresAll {
			t.Errorf("%s: stores %q is not StoresS3, StoresS3HTTP or StoresAll", p.Name, p.Stores)
		}
	}
}
