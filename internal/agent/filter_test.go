package agent

import (
	"regexp"
	"testing"

	"github.com/nixspool/nixspool/internal/nixstore"
)

func TestFilter(t *testing.T) {
	f := testFilter(Config{Excludes: []string{"-source$", "^doc-"}, MaxNARSize: 1000, SkipSignedBy: []string{"cache.nixos.org-1"}})
	const h = "/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7q-"
	for _, c := range []struct {
		info              nixstore.PathInfo
		exclude, upstream bool
	}{
		{nixstore.PathInfo{Path: h + "hello-2.12", NarSize: 10}, false, false},
		{nixstore.PathInfo{Path: h + "hello-2.12-source", NarSize: 10}, true, false},
		{nixstore.PathInfo{Path: h + "doc-x", NarSize: 10}, true, false},
		{nixstore.PathInfo{Path: h + "big", NarSize: 1001}, true, false},
		{nixstore.PathInfo{Path: h + "glibc", NarSize: 10, Sigs: []string{"cache.nixos.org-1:abc=="}}, false, true},
		{nixstore.PathInfo{Path: h + "mine", NarSize: 10, Sigs: []string{"my-cache-1:abc=="}}, false, false},
	} {
		if got := f.exclude(&c.info); got != c.exclude {
			t.Errorf("exclude(%s) = %v, want %v", c.info.Path, got, c.exclude)
		}
		if got := f.upstream(&c.info); got != c.upstream {
			t.Errorf("upstream(%s) = %v, want %v", c.info.Path, got, c.upstream)
		}
	}
	if testFilter(Config{}).active() {
		t.Error("empty filter is active")
	}
}

// testFilter is the filter of cfg, whose patterns must compile.
func testFilter(cfg Config) *filter {
	p := parsedConfig{Config: cfg}
	for _, e := range cfg.Excludes {
		p.excludes = append(p.excludes, regexp.MustCompile(e))
	}
	return newFilter(p)
}
