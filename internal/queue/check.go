package queue

import (
	"encoding/binary"
	"errors"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Check verifies the bbolt file's consistency and the queue's own
// invariants: every job is in exactly the index of its state, the path index
// and the active index agree with the jobs, and the counters match. It scans
// everything and is meant for tests and `agentctl`-driven diagnostics.
func (q *Queue) Check() error {
	return q.db.View(func(tx *bolt.Tx) error {
		var errs []error
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		if len(errs) > 0 {
			return fmt.Errorf("bbolt check: %w", errors.Join(errs...))
		}
		return checkInvariants(tx)
	})
}

func checkInvariants(tx *bolt.Tx) error {
	jobs := map[uint64]*Job{}
	counts := map[string]int64{}
	if err := tx.Bucket(bktJobs).ForEach(func(k, v []byte) error {
		j, err := decodeJob(v)
		if err != nil {
			return err
		}
		j.ID = binary.BigEndian.Uint64(k)
		jobs[j.ID] = j
		counts[counterKey(j)]++
		if j.Source != SourceUnknown {
			counts[cntSourcePfx+string(j.Source)]++
		}
		return nil
	}); err != nil {
		return err
	}
	seen := map[uint64]string{}
	mark := func(bkt string, id uint64) error {
		if prev, ok := seen[id]; ok {
			return fmt.Errorf("job %d is in both %s and %s", id, prev, bkt)
		}
		seen[id] = bkt
		return nil
	}
	if err := tx.Bucket(bktReady).ForEach(func(k, _ []byte) error {
		id := binary.BigEndian.Uint64(k[8:])
		j, ok := jobs[id]
		if !ok || j.State != StateReady || string(readyKey(j)) != string(k) {
			return fmt.Errorf("ready index entry for job %d does not match its record", id)
		}
		return mark("ready", id)
	}); err != nil {
		return err
	}
	for _, s := range []struct {
		bkt   []byte
		state State
	}{{bktFailed, StateFailed}} {
		if err := tx.Bucket(s.bkt).ForEach(func(k, _ []byte) error {
			id := binary.BigEndian.Uint64(k)
			if j, ok := jobs[id]; !ok || j.State != s.state {
				return fmt.Errorf("%s index entry for job %d does not match its record", s.state, id)
			}
			return mark(string(s.state), id)
		}); err != nil {
			return err
		}
	}
	if len(seen) != len(jobs) {
		return fmt.Errorf("%d jobs but %d state index entries", len(jobs), len(seen))
	}
	active := 0
	if err := tx.Bucket(bktActive).ForEach(func(k, _ []byte) error {
		active++
		j, ok := jobs[binary.BigEndian.Uint64(k)]
		if !ok || j.State == StateFailed {
			return fmt.Errorf("active index holds job %d that is not ready", binary.BigEndian.Uint64(k))
		}
		return nil
	}); err != nil {
		return err
	}
	if want := counts[cntPending] + counts[cntRetrying]; int64(active) != want {
		return fmt.Errorf("active index has %d entries, want %d", active, want)
	}
	paths := 0
	if err := tx.Bucket(bktPaths).ForEach(func(k, v []byte) error {
		paths++
		j, ok := jobs[binary.BigEndian.Uint64(v)]
		if !ok || j.Path != string(k) {
			return fmt.Errorf("path index entry %q does not match a job", k)
		}
		return nil
	}); err != nil {
		return err
	}
	if paths != len(jobs) {
		return fmt.Errorf("path index has %d entries for %d jobs", paths, len(jobs))
	}
	m := tx.Bucket(bktMeta)
	keys := []string{cntPending, cntRetrying, cntFailed}
	for _, src := range Sources {
		if src != SourceUnknown {
			keys = append(keys, cntSourcePfx+string(src))
		}
	}
	for _, k := range keys {
		if got := counter(m, k); got != counts[k] {
			return fmt.Errorf("counter %s = %d, want %d", k, got, counts[k])
		}
	}
	return nil
}
