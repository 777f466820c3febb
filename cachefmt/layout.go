package cachefmt

import (
	"strings"

	"github.com/nixspool/nixspool/storepath"
)

// Layout is the key layout of a binary cache: where stock Nix writes (and
// looks for) each kind of object, and where nixspool keeps its own objects
// (under OwnPrefix, which Nix never reads). Every key is built and taken
// apart here; Keys is its value.
type Layout struct{}

// Keys is the layout of every binary cache.
var Keys Layout

// Fixed keys and prefixes of a binary cache.
const (
	// CacheInfoKey is the cache's nix-cache-info (StoreDir, priority…).
	CacheInfoKey = "nix-cache-info"
	// NARPrefix holds NAR files: nar/<file hash>.nar<extension>.
	NARPrefix = "nar/"
	// LogPrefix holds build logs: log/<derivation base name>.
	LogPrefix = "log/"
	// RealisationPrefix holds realisations in the Nix 2.4 … 2.34 layout:
	// realisations/<id>.doi.
	RealisationPrefix = "realisations/"
	// BuildTracePrefix holds build trace entries in the Nix 2.35 layout:
	// build-trace-v2/<derivation base name>/<output>.doi.
	BuildTracePrefix = "build-trace-v2/"

	narinfoSuffix     = ".narinfo"
	listingSuffix     = ".ls"
	narSuffix         = ".nar"
	realisationSuffix = ".doi"
)

// The collector's objects. Nix never reads anything under OwnPrefix, and
// nothing there is ever a narinfo, NAR or nix-cache-info.
const (
	// OwnPrefix is everything of nixspool's.
	OwnPrefix = "nixspool/"
	// GCLeaseKey holds the lease of the one collector at work.
	GCLeaseKey = "nixspool/gc/lease"
	// GCAnnouncePrefix holds one announcement per cycle:
	// nixspool/gc/doomed/<cycle>.json.zst.
	GCAnnouncePrefix = "nixspool/gc/doomed/"
	// GCDonePrefix holds one marker per finished (retired) cycle:
	// nixspool/gc/done/<cycle>.
	GCDonePrefix = "nixspool/gc/done/"
	// GCPollPrefix is what watchers list: the lease, announcements and done
	// markers (and the collector's probes of the store), nothing else.
	GCPollPrefix = "nixspool/gc/"
	// WatcherPrefix holds one record per agent that follows the collector's
	// protocol: nixspool/watchers/<agent id>.
	WatcherPrefix = "nixspool/watchers/"
	// PinPrefix holds pins: nixspool/pins/<name> holds a store path.
	PinPrefix = "nixspool/pins/"
	// GCProbePrefix starts the collector's probes of the store (conditional
	// writes, listing lag), each deleted once measured; they lie under
	// GCPollPrefix, where a watcher's listing shows them.
	GCProbePrefix = "nixspool/gc/probe-"
	// DoctorProbePrefix starts the probe object agentctl doctor writes
	// and deletes: nixspool-probe/<host>-<random>.
	DoctorProbePrefix = "nixspool-probe/"

	gcAnnounceSuffix = ".json.zst"
)

// Kind is what a key holds, by its layout alone.
type Kind int

// The kinds of keys.
const (
	KindOther       Kind = iota // anything else (debuginfo/, foreign files)
	KindNarinfo                 // <hash>.narinfo
	KindNAR                     // nar/…
	KindListing                 // <hash>.ls
	KindLog                     // log/<drv>
	KindRealisation             // realisations/<id>.doi or build-trace-v2/<drv>/<out>.doi
	KindCacheInfo               // nix-cache-info
	KindOwn                     // nixspool/…
)

// Kind classifies key.
func (Layout) Kind(key string) Kind {
	l := Keys
	switch {
	case strings.HasPrefix(key, OwnPrefix):
		return KindOwn
	case l.NarinfoHash(key) != "":
		return KindNarinfo
	case l.IsNAR(key):
		return KindNAR
	case l.ListingHash(key) != "":
		return KindListing
	case strings.HasPrefix(key, LogPrefix):
		return KindLog
	case l.IsRealisation(key):
		return KindRealisation
	case key == CacheInfoKey:
		return KindCacheInfo
	}
	return KindOther
}

// Narinfo is the key of the narinfo of the store path with hash part hash:
// <hash>.narinfo at the cache root.
func (Layout) Narinfo(hash string) string { return hash + narinfoSuffix }

// NarinfoOf is the key of the narinfo of a store path (absolute or base
// name).
func (l Layout) NarinfoOf(path string) string { return l.Narinfo(storepath.HashPart(path)) }

// NarinfoHash returns the hash part of a narinfo key ("<hash>.narinfo" at
// the cache root), or "" if key is not one.
func (Layout) NarinfoHash(key string) string {
	h, ok := strings.CutSuffix(key, narinfoSuffix)
	if !ok || !IsHashPart(h) {
		return ""
	}
	return h
}

// NAR is the key of a NAR file as Nix names it: nar/<file hash, nix32>.nar
// followed by the compression's extension (ext, as Extension returns it).
func (Layout) NAR(fileHash, ext string) string { return NARPrefix + fileHash + narSuffix + ext }

// IsNAR reports whether key is under nar/.
func (Layout) IsNAR(key string) bool { return strings.HasPrefix(key, NARPrefix) }

// Listing is the key of the listing (.ls) of the store path with hash part
// hash.
func (Layout) Listing(hash string) string { return hash + listingSuffix }

// ListingOf is the key of the listing of a store path (absolute or base
// name).
func (l Layout) ListingOf(path string) string { return l.Listing(storepath.HashPart(path)) }

// ListingHash returns the hash part of a ".ls" key, or "".
func (Layout) ListingHash(key string) string {
	h, ok := strings.CutSuffix(key, listingSuffix)
	if !ok || !IsHashPart(h) {
		return ""
	}
	return h
}

// Log is the key of the build log of a derivation (its base name).
func (Layout) Log(drvBase string) string { return LogPrefix + drvBase }

// LogDrv returns the derivation base name a log key names.
func (Layout) LogDrv(key string) (drvBase string, ok bool) {
	return strings.CutPrefix(key, LogPrefix)
}

// Realisation is the key of a realisation in the Nix 2.4 … 2.34 layout:
// realisations/<id>.doi, id = sha256:<hash modulo of the drv>!<output>.
func (Layout) Realisation(id string) string {
	return RealisationPrefix + id + realisationSuffix
}

// RealisationID returns the id a realisations/ key names.
func (Layout) RealisationID(key string) (id string, ok bool) {
	id, ok = strings.CutPrefix(key, RealisationPrefix)
	if !ok {
		return "", false
	}
	return strings.TrimSuffix(id, realisationSuffix), true
}

// BuildTrace is the key of a build trace entry in the Nix 2.35 layout.
func (Layout) BuildTrace(drvBase, output string) string {
	return BuildTracePrefix + drvBase + "/" + output + realisationSuffix
}

// BuildTraceParts splits a build-trace-v2/ key into the derivation base
// name and output it names, unchecked (output is "" when the key has no
// second part).
func (Layout) BuildTraceParts(key string) (drvBase, output string) {
	rest := strings.TrimSuffix(strings.TrimPrefix(key, BuildTracePrefix), realisationSuffix)
	drvBase, output, _ = strings.Cut(rest, "/")
	return drvBase, output
}

// IsRealisation reports whether key is a realisation in either layout.
func (Layout) IsRealisation(key string) bool {
	return strings.HasSuffix(key, realisationSuffix) &&
		(strings.HasPrefix(key, RealisationPrefix) || strings.HasPrefix(key, BuildTracePrefix))
}

// GCAnnouncement is the key of a collector cycle's announcement.
func (Layout) GCAnnouncement(cycle string) string {
	return GCAnnouncePrefix + cycle + gcAnnounceSuffix
}

// GCDone is the key of a collector cycle's done marker.
func (Layout) GCDone(cycle string) string { return GCDonePrefix + cycle }

// GCCycle returns the cycle an announcement or done key names, or "".
func (Layout) GCCycle(key string) (cycle string, announce bool) {
	if c, ok := strings.CutPrefix(key, GCAnnouncePrefix); ok {
		c, ok = strings.CutSuffix(c, gcAnnounceSuffix)
		if ok && ValidCycle(c) {
			return c, true
		}
		return "", false
	}
	if c, ok := strings.CutPrefix(key, GCDonePrefix); ok && ValidCycle(c) {
		return c, false
	}
	return "", false
}

// ValidCycle reports whether c may name a collector cycle: 1 to 64
// letters, digits and dashes.
func ValidCycle(c string) bool {
	if c == "" || len(c) > 64 {
		return false
	}
	for _, r := range c {
		if !(r >= '0' && r <= '9' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r == '-') {
			return false
		}
	}
	return true
}

// Watcher is the key of an agent's watcher record.
func (Layout) Watcher(id string) string { return WatcherPrefix + id }

// Pin is the key of the pin named name.
func (Layout) Pin(name string) string { return PinPrefix + name }

// PinName returns the name a pin key names.
func (Layout) PinName(key string) (name string, ok bool) { return strings.CutPrefix(key, PinPrefix) }

// Object is an object to write to a cache: its key, content type and body.
type Object struct {
	Key, ContentType string
	Body             []byte
}
