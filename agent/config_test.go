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
