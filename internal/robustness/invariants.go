package robustness

import (
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
)

// problem is one way a snapshot of the bucket is not a cache stock Nix can
// use.
type problem struct{ key, what string }

func (p problem) String() string { return p.key + ": " + p.what }

// structure checks a snapshot: every narinfo parses, has its NAR with the
// size and compression it claims, and narinfos for all its references; a
// bucket with any narinfo has nix-cache-info.
func structure(snap map[string][]byte) []problem {
	var out []problem
	narinfos := 0
	for key, data := range snap {
		h := cachefmt.Keys.NarinfoHash(key)
		if h == "" || strings.Contains(key, "/") {
			continue
		}
		narinfos++
		ni, err := cachefmt.ParseNarInfo(data)
		if err != nil {
			out = append(out, problem{key, "does not parse: " + err.Error()})
			continue
		}
		nar, ok := snap[ni.URL]
		switch {
		case !ok:
			out = append(out, problem{key, "its NAR " + ni.URL + " is missing"})
		case ni.FileSize >= 0 && int64(len(nar)) != ni.FileSize:
			out = append(out, problem{key, fmt.Sprintf("its NAR has %d bytes, FileSize says %d", len(nar), ni.FileSize)})
		case cachefmt.DetectCompression(nar) != ni.EffectiveCompression() && !(ni.EffectiveCompression() == "none" && cachefmt.DetectCompression(nar) == ""):
			out = append(out, problem{key, fmt.Sprintf("its NAR is compressed with %q, the narinfo says %q", cachefmt.DetectCompression(nar), ni.EffectiveCompression())})
		}
		for _, r := range ni.References {
			rh := cachefmt.RefHash(r)
			if rh == "" || rh == h {
				continue
			}
			if _, ok := snap[cachefmt.Keys.Narinfo(rh)]; !ok {
				out = append(out, problem{key, "reference " + r + " has no narinfo"})
			}
		}
	}
	if _, ok := snap[cachefmt.CacheInfoKey]; narinfos > 0 && !ok {
		out = append(out, problem{"nix-cache-info", fmt.Sprintf("missing while %d narinfos are there", narinfos)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out
}

// closureProblems lists what of p's closure the snapshot lacks.
func closureProblems(snap map[string][]byte, closure []string) []string {
	var missing []string
	for _, q := range closure {
		if _, ok := snap[cachefmt.Keys.NarinfoOf(q)]; !ok {
			missing = append(missing, q)
		}
	}
	return missing
}

// monitor samples the invariants while a schedule runs.
type monitor struct {
	s *ObjectStore
	// repairWithin: a problem that an in-flight reset can cause (a write
	// that lands just after the bucket was emptied) is tolerated if it is
	// gone within this time; any other problem counts at once.
	repairWithin time.Duration

	mu         sync.Mutex
	firstSeen  map[problem]time.Time
	reported   map[problem]bool
	samples    int
	goroutines int
	heap       uint64
	limits     struct {
		goroutines int
		heap       uint64
	}
}

func newMonitor(s *ObjectStore, repairWithin time.Duration, baseGoroutines int) *monitor {
	m := &monitor{s: s, repairWithin: repairWithin, firstSeen: map[problem]time.Time{}, reported: map[problem]bool{}}
	m.limits.goroutines = baseGoroutines + 2000
	m.limits.heap = 768 << 20
	return m
}

// sample checks the bucket once, and the process's goroutines and heap.
func (m *monitor) sample() {
	now := time.Now()
	probs := structure(m.s.Snapshot())
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	g := runtime.NumGoroutine()
	lastReset := m.s.lastReset()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.samples++
	m.goroutines = max(m.goroutines, g)
	m.heap = max(m.heap, ms.HeapInuse)
	if g > m.limits.goroutines && !m.reported[problem{"goroutines", ""}] {
		m.reported[problem{"goroutines", ""}] = true
		m.s.violate("%d goroutines, more than the bound %d", g, m.limits.goroutines)
	}
	if ms.HeapInuse > m.limits.heap && !m.reported[problem{"heap", ""}] {
		m.reported[problem{"heap", ""}] = true
		m.s.violate("heap in use %d MiB, more than the bound %d MiB", ms.HeapInuse>>20, m.limits.heap>>20)
	}
	current := map[problem]bool{}
	for _, p := range probs {
		current[p] = true
		first, ok := m.firstSeen[p]
		if !ok {
			first = now
			m.firstSeen[p] = now
		}
		if m.reported[p] {
			continue
		}
		// Excused for a while only if a reset happened shortly before it
		// was first seen: a write that was under way when the bucket was
		// emptied.
		excusable := !lastReset.IsZero() && first.Sub(lastReset) < m.repairWithin
		if !excusable || now.Sub(first) > m.repairWithin {
			m.reported[p] = true
			m.s.violate("bucket: %s (seen for %s; last reset %s before it was first seen)", p, now.Sub(first).Round(time.Millisecond), first.Sub(lastReset).Round(time.Millisecond))
		}
	}
	for p := range m.firstSeen {
		if !current[p] {
			delete(m.firstSeen, p)
		}
	}
}
