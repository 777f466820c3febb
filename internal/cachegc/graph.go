package cachegc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// snapshot is one listing of the whole bucket, sorted by kind. Keys Nix
// reads that are not listed here (nix-cache-info, debuginfo/, anything
// unknown) are never touched.
type snapshot struct {
	narinfos     map[string]bucket.Object // by hash part
	nars         map[string]bucket.Object // by key
	listings     map[string]bucket.Object // by hash part
	logs         map[string]bucket.Object // by key
	realisations map[string]bucket.Object // by key
	pins         map[string]bucket.Object // by key
	watchers     map[string]bucket.Object // by key
	cycles       map[string]bucket.Object // announcements and done markers, by key
	objects      int                      // objects of the cache (not ours)
	bytes        int64
	// info holds what was read from narinfos (by hash part), and from
	// realisations and pins (by key).
	info map[string]*objInfo
}

// listAll lists the bucket.
func listAll(ctx context.Context, b bucket.Bucket) (*snapshot, error) {
	s := &snapshot{
		narinfos: map[string]bucket.Object{}, nars: map[string]bucket.Object{}, listings: map[string]bucket.Object{},
		logs: map[string]bucket.Object{}, realisations: map[string]bucket.Object{}, pins: map[string]bucket.Object{},
		watchers: map[string]bucket.Object{}, cycles: map[string]bucket.Object{}, info: map[string]*objInfo{},
	}
	err := b.List(ctx, bucket.ListOptions{Recursive: true}, func(o bucket.Object) error {
		k := o.Key
		kind := cachefmt.Keys.Kind(k)
		if kind == cachefmt.KindOwn {
			switch {
			case strings.HasPrefix(k, PinPrefix):
				if validPinName(pinName(k)) {
					s.pins[k] = o
				}
			case strings.HasPrefix(k, WatcherPrefix):
				s.watchers[k] = o
			case strings.HasPrefix(k, AnnouncePrefix) || strings.HasPrefix(k, DonePrefix):
				s.cycles[k] = o
			}
			return nil
		}
		s.objects++
		s.bytes += o.Size
		switch kind {
		case cachefmt.KindNarinfo:
			s.narinfos[cachefmt.Keys.NarinfoHash(k)] = o
		case cachefmt.KindNAR:
			s.nars[k] = o
		case cachefmt.KindListing:
			s.listings[cachefmt.Keys.ListingHash(k)] = o
		case cachefmt.KindLog:
			s.logs[k] = o
		case cachefmt.KindRealisation:
			s.realisations[k] = o
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// readJob is one object whose content the collector needs.
type readJob struct {
	id  string // hash part for narinfos, key otherwise
	key string
	obj bucket.Object
	// read fetches and interprets the object.
	read func(ctx context.Context, b bucket.Bucket, key string) (*objInfo, error)
}

// load fills s.info: from prev (an earlier snapshot of this run), from the
// reference cache, and else by reading the object (with up to conc reads
// in flight). Objects deleted since the listing are dropped from s.
func load(ctx context.Context, b bucket.Bucket, s, prev *snapshot, cache *RefCache, conc int, progress func(done, total int)) error {
	var jobs []readJob
	for h, o := range s.narinfos {
		jobs = append(jobs, readJob{id: h, key: o.Key, obj: o, read: readNarinfo})
	}
	for k, o := range s.realisations {
		jobs = append(jobs, readJob{id: k, key: k, obj: o, read: readRealisation})
	}
	for k, o := range s.pins {
		jobs = append(jobs, readJob{id: k, key: k, obj: o, read: readPin})
	}
	want := map[string]string{}
	var todo []readJob
	for _, j := range jobs {
		if prev != nil {
			if o := prev.info[j.id]; o != nil && o.ETag == j.obj.ETag && j.obj.ETag != "" {
				s.info[j.id] = o
				continue
			}
		}
		want[j.key] = j.obj.ETag
		todo = append(todo, j)
	}
	known, err := cache.lookup(want)
	if err != nil {
		return err
	}
	var missing []readJob
	for _, j := range todo {
		if o := known[j.key]; o != nil {
			s.info[j.id] = o
		} else {
			missing = append(missing, j)
		}
	}
	var mu sync.Mutex
	fresh := map[string]*objInfo{}
	var gone []readJob
	var done atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(conc)
	for _, j := range missing {
		g.Go(func() error {
			defer func() {
				if n := done.Add(1); progress != nil && n%256 == 0 {
					progress(int(n), len(missing))
				}
			}()
			o, err := j.read(gctx, b, j.key)
			if bucket.IsNotExist(err) {
				mu.Lock()
				gone = append(gone, j)
				mu.Unlock()
				return nil
			}
			if err != nil {
				return err
			}
			o.ETag = j.obj.ETag
			mu.Lock()
			s.info[j.id] = o
			fresh[j.key] = o
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if progress != nil {
		progress(len(missing), len(missing))
	}
	for _, j := range gone {
		delete(s.narinfos, j.id)
		delete(s.realisations, j.id)
		delete(s.pins, j.id)
	}
	return cache.store(fresh)
}

// readNarinfo reads a narinfo as stock Nix would (tolerantly, undoing its
// Content-Encoding). One that does not parse is marked Bad.
func readNarinfo(ctx context.Context, b bucket.Bucket, key string) (*objInfo, error) {
	data, info, err := b.Get(ctx, key, cachefmt.MaxNarinfoSize)
	if err != nil {
		return nil, err
	}
	plain, err := cachefmt.DecodeContentEncoding(info.ContentEncoding, data)
	if errors.Is(err, cachefmt.ErrTooLarge) {
		// Nix might read it; its references are unknown here, so nothing
		// may be collected until an operator looks at it.
		return nil, fmt.Errorf("narinfo %s: %w; nixspool never writes such narinfos: check it and delete it by hand", key, err)
	}
	if err != nil {
		return &objInfo{Bad: true}, nil
	}
	ni, err := cachefmt.ParseNarInfo(plain)
	if err != nil || ni.HashPart() != cachefmt.Keys.NarinfoHash(key) {
		return &objInfo{Bad: true}, nil
	}
	o := &objInfo{Path: ni.StorePath, URL: ni.URL, Deriver: ni.Deriver}
	self := ni.HashPart()
	for _, r := range ni.References {
		if h := cachefmt.RefHash(r); h != "" && h != self {
			o.Refs = append(o.Refs, h)
		}
	}
	return o, nil
}

// readRealisation reads a realisation's output path: a realisation refers
// to its output as a narinfo refers to its references.
func readRealisation(ctx context.Context, b bucket.Bucket, key string) (*objInfo, error) {
	data, _, err := b.Get(ctx, key, 1<<20)
	if err != nil {
		return nil, err
	}
	var r struct {
		OutPath string `json:"outPath"`
	}
	if json.Unmarshal(data, &r) != nil || cachefmt.RefHash(r.OutPath) == "" {
		return &objInfo{Bad: true}, nil
	}
	return &objInfo{Path: r.OutPath, Refs: []string{cachefmt.RefHash(r.OutPath)}}, nil
}

// readPin reads a pin: one store path.
func readPin(ctx context.Context, b bucket.Bucket, key string) (*objInfo, error) {
	data, _, err := b.Get(ctx, key, 4096)
	if err != nil {
		return nil, err
	}
	p := strings.TrimSpace(string(data))
	if storepath.Check(storepath.DefaultStoreDir, p) != nil {
		return &objInfo{Bad: true}, nil
	}
	return &objInfo{Path: p, Refs: []string{storepath.HashPart(p)}}, nil
}

// listed reports whether key (a narinfo, realisation or pin) is in s.
func (s *snapshot) listed(key string) bool {
	if h := cachefmt.Keys.NarinfoHash(key); h != "" {
		_, ok := s.narinfos[h]
		return ok
	}
	_, real := s.realisations[key]
	_, pin := s.pins[key]
	return real || pin
}

// refs returns the references of the narinfo with hash part h.
func (s *snapshot) refs(h string) []string {
	if o := s.info[h]; o != nil {
		return o.Refs
	}
	return nil
}

// closure returns every narinfo (hash part) reachable from roots through
// references, among the narinfos of s.
func (s *snapshot) closure(roots []string) map[string]bool {
	seen := map[string]bool{}
	stack := append([]string(nil), roots...)
	for len(stack) > 0 {
		h := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[h] {
			continue
		}
		if _, ok := s.narinfos[h]; !ok {
			continue
		}
		seen[h] = true
		stack = append(stack, s.refs(h)...)
	}
	return seen
}

// layers orders the narinfos in del (hash parts) for deletion, referrers
// first: no narinfo of a layer is referenced by a narinfo of the same or a
// later layer. Narinfos that reference each other in a cycle (stock Nix
// never writes such) come last, together.
func layers(s *snapshot, del map[string]bool) [][]string {
	referrers := map[string]int{}
	for h := range del {
		for _, r := range s.refs(h) {
			if del[r] && r != h {
				referrers[r]++
			}
		}
	}
	var out [][]string
	var cur []string
	for h := range del {
		if referrers[h] == 0 {
			cur = append(cur, h)
		}
	}
	left := len(del)
	for len(cur) > 0 {
		out = append(out, cur)
		left -= len(cur)
		var next []string
		for _, h := range cur {
			for _, r := range s.refs(h) {
				if del[r] && r != h {
					referrers[r]--
					if referrers[r] == 0 {
						next = append(next, r)
					}
				}
			}
		}
		cur = next
	}
	if left > 0 {
		var rest []string
		for h := range del {
			if referrers[h] > 0 {
				rest = append(rest, h)
			}
		}
		out = append(out, rest)
	}
	return out
}
