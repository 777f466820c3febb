package agent

import (
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	c := DefaultConfig()
	c.SecretKeyFiles = []string{"/etc/nixspool/key"}
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if c.Cache != "file:///var/lib/nixspool/cache" {
		t.Fatalf("default cache = %q", c.Cache)
	}
	bad := DefaultConfig()
	bad.Cache = "s3://b?bogus=1"
	bad.Jobs = 0
	bad.StateDir = "relative"
	bad.Excludes = []string{"("}
	err := bad.Validate()
	if err == nil || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Validate = %q, want one line", err)
	}
	for _, want := range []string{"bogus", "--secret-key-file", "--jobs 0", "--state-dir", "--exclude"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}

// TestKeyInCacheURLSatisfiesKeyRequirement: secret-key= in the cache URL
// is a signing key like --secret-key-file.
func TestKeyInCacheURLSatisfiesKeyRequirement(t *testing.T) {
	c := DefaultConfig()
	c.Cache = "s3://bucket?endpoint=http://127.0.0.1:9000&secret-key=/etc/nix/cache.key"
	if err := c.Validate(); err != nil {
		t.Fatalf("key in the URL: %v", err)
	}
	c.Cache = "s3://bucket?endpoint=http://127.0.0.1:9000&secret-keys="
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "secret-key") {
		t.Fatalf("no key anywhere: %v", err)
	}
}

// TestConfigParseKeepsParsedValues: parse hands New the cache URL and the
// exclude patterns it parsed, so that New parses neither again.
func TestConfigParseKeepsParsedValues(t *testing.T) {
	c := DefaultConfig()
	c.Cache = "s3://bucket?endpoint=http://127.0.0.1:9000&compression=zstd&secret-key=/etc/nix/cache.key"
	c.Excludes = []string{"-source$"}
	p, err := c.parse()
	if err != nil {
		t.Fatal(err)
	}
	if p.cache == nil || p.cache.Compression != "zstd" || len(p.cache.SecretKeyFiles) != 1 {
		t.Fatalf("parsed cache = %+v", p.cache)
	}
	if len(p.excludes) != 1 || !p.excludes[0].MatchString("foo-source") {
		t.Fatalf("parsed excludes = %v", p.excludes)
	}
	if p.Cache != c.Cache {
		t.Fatalf("parsed config's cache URL = %q, want %q", p.Cache, c.Cache)
	}
}
