package agent

import (
	"regexp"
	"strings"

	"github.com/nixspool/nixspool/nixstore"
	"github.com/nixspool/nixspool/storepath"
)

// filter decides which paths are not uploaded: names matching an exclude
// pattern, NARs above the size limit, and paths already signed by an
// upstream cache's key (clients substitute those from upstream). A
// filtered path counts as present for the closure rule.
type filter struct {
	excludes []*regexp.Regexp
	maxSize  uint64
	signers  map[string]bool
}

func newFilter(cfg Config) *filter {
	f := &filter{maxSize: uint64(cfg.MaxNARSize), signers: map[string]bool{}}
	for _, e := range cfg.Excludes {
		f.excludes = append(f.excludes, regexp.MustCompile(e)) // validated by Config.Validate
	}
	for _, k := range cfg.SkipSignedBy {
		if k != "" {
			f.signers[k] = true
		}
	}
	return f
}

// active reports whether any filter is configured.
func (f *filter) active() bool {
	return len(f.excludes) > 0 || f.maxSize > 0 || len(f.signers) > 0
}

// skip implements uploader.Options.Skip.
func (f *filter) skip(info *nixstore.PathInfo) bool {
	if base := info.Path[strings.LastIndexByte(info.Path, '/')+1:]; storepath.CheckBase(base) == nil {
		name := base[33:]
		for _, re := range f.excludes {
			if re.MatchString(name) {
				return true
			}
		}
	}
	if f.maxSize > 0 && info.NarSize > f.maxSize {
		return true
	}
	for _, s := range info.Sigs {
		if name, _, ok := strings.Cut(s, ":"); ok && f.signers[name] {
			return true
		}
	}
	return false
}
