package agent

import (
	"regexp"
	"strings"

	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/storepath"
)

// filter decides which paths are not uploaded.
//
// Paths already signed by an upstream cache's key (--skip-signed-by) are
// never uploaded and count as present: clients substitute them from the
// upstream cache, so narinfos in this cache may name them.
//
// Names matching an exclude pattern and NARs above the size limit are not
// uploaded when a job is for them (the hook or agentctl push handed them
// over); a path that an uploaded path references is uploaded regardless,
// so that the cache never holds a narinfo naming a reference it cannot
// serve.
type filter struct {
	excludes []*regexp.Regexp
	maxSize  uint64
	signers  map[string]bool
}

// newFilter makes the filter of a parsed configuration.
func newFilter(cfg parsedConfig) *filter {
	f := &filter{excludes: cfg.excludes, maxSize: uint64(cfg.MaxNARSize), signers: map[string]bool{}}
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

// upstream implements uploader.Options.Upstream.
func (f *filter) upstream(info *nixstore.PathInfo) bool {
	for _, s := range info.Sigs {
		if name, _, ok := strings.Cut(s, ":"); ok && f.signers[name] {
			return true
		}
	}
	return false
}

// exclude implements uploader.Options.Exclude.
func (f *filter) exclude(info *nixstore.PathInfo) bool {
	if base := info.Path[strings.LastIndexByte(info.Path, '/')+1:]; storepath.CheckBase(base) == nil {
		name := base[33:]
		for _, re := range f.excludes {
			if re.MatchString(name) {
				return true
			}
		}
	}
	return f.maxSize > 0 && info.NarSize > f.maxSize
}
