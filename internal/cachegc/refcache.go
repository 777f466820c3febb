package cachegc

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// objInfo is what the collector reads from a narinfo (or a pin, or a
// realisation): enough to walk references and to find the NAR, listing
// and build log that belong to it.
type objInfo struct {
	ETag    string
	Path    string   // narinfo: its StorePath; pin: the pinned path
	URL     string   // narinfo: its NAR's key
	Deriver string   // narinfo: the base name of its derivation
	Refs    []string // hash parts: a narinfo's references (not itself); a realisation's output
	Bad     bool     // unparsable: kept, and relied on by nothing
}

const refRecordVersion = 1

func (o *objInfo) encode() []byte {
	bad := "0"
	if o.Bad {
		bad = "1"
	}
	return []byte(string(rune(refRecordVersion)) + strings.Join([]string{o.ETag, o.Path, o.URL, o.Deriver, bad, strings.Join(o.Refs, " ")}, "\n"))
}

func decodeObjInfo(v []byte) (*objInfo, bool) {
	if len(v) == 0 || v[0] != refRecordVersion {
		return nil, false
	}
	f := strings.Split(string(v[1:]), "\n")
	if len(f) != 6 {
		return nil, false
	}
	o := &objInfo{ETag: f[0], Path: f[1], URL: f[2], Deriver: f[3], Bad: f[4] == "1"}
	if f[5] != "" {
		o.Refs = strings.Split(f[5], " ")
	}
	return o, true
}

// RefCache remembers, per object key and ETag, what the collector read
// from a narinfo, a pin or a realisation, in a bbolt file in agentd's
// state directory. A new ETag means a new version of the object, so an
// entry is valid exactly as long as its ETag is the one listed: a run over
// an unchanged bucket reads listings only. One sub-bucket per cache
// identity keeps caches apart.
type RefCache struct {
	db       *bolt.DB
	identity []byte
}

var bktRefs = []byte("refs")

// OpenRefCache opens (creating) the cache file at path, for the cache with
// the given identity.
func OpenRefCache(path, identity string) (*RefCache, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("gc reference cache: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("gc reference cache %s is locked by another process", path)
	}
	if err != nil {
		return nil, fmt.Errorf("gc reference cache %s: %w", path, err)
	}
	c := &RefCache{db: db, identity: []byte(identity)}
	if err := db.Update(func(tx *bolt.Tx) error {
		top, err := tx.CreateBucketIfNotExists(bktRefs)
		if err != nil {
			return err
		}
		_, err = top.CreateBucketIfNotExists(c.identity)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("gc reference cache %s: %w", path, err)
	}
	return c, nil
}

// Close closes the file.
func (c *RefCache) Close() error {
	if c == nil {
		return nil
	}
	return c.db.Close()
}

func (c *RefCache) bucket(tx *bolt.Tx) *bolt.Bucket {
	return tx.Bucket(bktRefs).Bucket(c.identity)
}

// lookup returns the remembered entries of keys whose ETag is still the
// one given.
func (c *RefCache) lookup(want map[string]string) (map[string]*objInfo, error) {
	out := map[string]*objInfo{}
	if c == nil || len(want) == 0 {
		return out, nil
	}
	err := c.db.View(func(tx *bolt.Tx) error {
		b := c.bucket(tx)
		for k, etag := range want {
			if v := b.Get([]byte(k)); v != nil {
				if o, ok := decodeObjInfo(v); ok && o.ETag == etag && etag != "" {
					out[k] = o
				}
			}
		}
		return nil
	})
	return out, err
}

// store remembers entries (one commit).
func (c *RefCache) store(entries map[string]*objInfo) error {
	if c == nil || len(entries) == 0 {
		return nil
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		b := c.bucket(tx)
		for k, o := range entries {
			if err := b.Put([]byte(k), o.encode()); err != nil {
				return err
			}
		}
		return nil
	})
}

// prune forgets entries whose key is no longer in the bucket.
func (c *RefCache) prune(listed func(key string) bool) error {
	if c == nil {
		return nil
	}
	var gone [][]byte
	if err := c.db.View(func(tx *bolt.Tx) error {
		return c.bucket(tx).ForEach(func(k, _ []byte) error {
			if !listed(string(k)) {
				gone = append(gone, append([]byte(nil), k...))
			}
			return nil
		})
	}); err != nil || len(gone) == 0 {
		return err
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		b := c.bucket(tx)
		for _, k := range gone {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}
