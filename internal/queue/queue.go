// Package queue is agentd's durable job queue: one job per store path, kept
// in a bbolt file. It knows nothing about S3 or Nix beyond path strings.
//
// Durability: every mutation commits a bbolt transaction with fsync before it
// returns (NoSync is never set). Concurrent callers share one commit: a single
// committer goroutine takes the first waiting operation, gathers every other
// operation already waiting, and commits them together. A lone caller is
// committed at once, without the fixed delay of bbolt's DB.Batch.
//
// Layout (all integers big-endian, so byte order is numeric order):
//
//	jobs    id → record (version byte, then JSON)
//	ready   notBefore(unix ns) ‖ id → ∅   due jobs first; a cursor finds the next one
//	failed  id → ∅                        dead letter, kept until retry or drop
//	active  id → ∅                        ready jobs, oldest first
//	paths   store path → id               deduplication
//	meta    counters and the last error
//	uploads store path → the uploader's resume record for a large upload
//	presence/<cache identity>  store path → unix time it was seen in that cache
//
// State changes touch only these few keys; counts and the oldest pending job
// are read without scanning.
//
// Leases live in memory only. A leased job stays ready on disk until its
// outcome (Ack, RetryLater, Fail) commits, so a crash returns every job that
// was being uploaded to the queue without any recovery step, and taking a
// job costs no fsync: a job's life is two durable commits (enqueue and
// outcome), not three.
//
// Acknowledged means durable, also for the shortcut that answers a request
// whose paths are all queued already from a read transaction: bbolt lets a
// reader see a commit as soon as its meta page is written, before that page
// is fsynced, so the shortcut answers only when the transaction it read is
// one the committer has seen complete (it waits for the commit in flight
// otherwise).
package queue

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// State is where a job is in its life.
type State string

// Job states. A job that has been uploaded is deleted (and counted).
const (
	StateReady  State = "ready"  // waiting, possibly until NotBefore (retrying when Attempts > 0)
	StateLeased State = "leased" // being uploaded by a worker (in memory; ready on disk)
	StateFailed State = "failed" // dead letter: permanent error or attempts exhausted
)

// Job is one store path to upload.
type Job struct {
	ID   uint64 `json:"-"`
	Path string `json:"path"`
	Drv  string `json:"drv,omitempty"`
	// Drvs are the other derivations the path was requested for (a
	// resolved content-addressed build and the derivation clients know
	// share an output): each request was acknowledged, so each is kept.
	Drvs       []string  `json:"drvs,omitempty"`
	State      State     `json:"state"`
	Attempts   int       `json:"attempts,omitempty"`
	EnqueuedAt time.Time `json:"enqueued_at"`
	NotBefore  time.Time `json:"not_before"`
	LastError  string    `json:"last_error,omitempty"`
	// Source is where the path came from first (a later request from
	// elsewhere does not change it). Records written before sources were
	// kept have none: SourceUnknown.
	Source Source `json:"source,omitempty"`
}

// Source is where a job's path came from.
type Source string

// Sources of jobs.
const (
	SourceUnknown      Source = ""              // queued before sources were recorded
	SourceHook         Source = "hook"          // the post-build hook (directly or through the spool)
	SourcePush         Source = "push"          // agentctl push
	SourceCapture      Source = "capture"       // the store watcher (agentd --capture local|all)
	SourceBuildClosure Source = "build-closure" // a build-time closure push
)

// Sources are the known sources, in display order (SourceUnknown last).
var Sources = []Source{SourceHook, SourcePush, SourceCapture, SourceBuildClosure, SourceUnknown}

// String returns the source's name; SourceUnknown is "unknown".
func (s Source) String() string {
	if s == SourceUnknown {
		return "unknown"
	}
	return string(s)
}

// ParseSource parses a source's name ("unknown" for SourceUnknown).
func ParseSource(name string) (Source, error) {
	for _, s := range Sources {
		if s.String() == name {
			return s, nil
		}
	}
	return "", fmt.Errorf("unknown source %q (want hook, push, capture, build-closure or unknown)", name)
}

// Derivations returns every derivation the job's path was requested for,
// Drv first.
func (j *Job) Derivations() []string {
	var out []string
	if j.Drv != "" {
		out = append(out, j.Drv)
	}
	for _, d := range j.Drvs {
		if d != "" && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// addDrv records that the job's path was requested for drv too, and
// reports whether that is news.
func (j *Job) addDrv(drv string) bool {
	if drv == "" || slices.Contains(j.Derivations(), drv) {
		return false
	}
	if j.Drv == "" {
		j.Drv = drv
	} else {
		j.Drvs = append(j.Drvs, drv)
	}
	return true
}

// Errors.
var (
	ErrNotFound = errors.New("no such job")
	ErrState    = errors.New("job is not in the required state")
	ErrLocked   = errors.New("queue database is locked by another process (is another agentd running?)")
	ErrClosed   = errors.New("queue closed")
)

const recordVersion = 1

var (
	bktJobs     = []byte("jobs")
	bktReady    = []byte("ready")
	bktFailed   = []byte("failed")
	bktActive   = []byte("active")
	bktPaths    = []byte("paths")
	bktMeta     = []byte("meta")
	bktUploads  = []byte("uploads")
	bktPresence = []byte("presence")
	allBkts     = [][]byte{bktJobs, bktReady, bktFailed, bktActive, bktPaths, bktMeta, bktUploads, bktPresence}
)

// Counter keys in the meta bucket.
const (
	cntPending   = "n_pending"
	cntRetrying  = "n_retrying"
	cntFailed    = "n_failed"
	cntUploaded  = "n_uploaded"
	cntNARBytes  = "n_nar_bytes"
	cntFileBytes = "n_file_bytes"
	cntSkipped   = "n_skipped"
	cntPaths     = "n_paths"
	cntReals     = "n_realisations"
	cntSourcePfx = "n_src_" // ‖ source: jobs queued (any state) from that source; none for SourceUnknown
	keyMarkPfx   = "mark/"  // ‖ name: a caller's record (see Mark)
	keyLastErr   = "last_error"
	keyLastErrAt = "last_error_at"
)

// Queue is an open queue database. Its methods are safe for concurrent use.
type Queue struct {
	// Lock order: mu before any read transaction, never the reverse. The
	// committer takes mu inside write transactions (Fail decides there), so
	// whoever holds mu must not wait for a commit; readers never wait for
	// the writer.
	db   *bolt.DB
	ops  chan *op
	stop chan struct{}
	done chan struct{}
	wake chan struct{}

	// closing guards closed: senders on ops hold it for reading, so once
	// Close has set closed no operation can reach ops any more, and the
	// committer can drain what is there.
	closing sync.RWMutex
	closed  bool

	mu     sync.Mutex
	leased map[uint64]Job // in-memory leases
	// dropped holds jobs dropped while leased: the worker's outcome for
	// them is accepted quietly (there is nothing left to record).
	dropped map[uint64]struct{}
	// again holds leased jobs whose path was requested again while they
	// were being uploaded: if that attempt fails for good, the new request
	// still means "will be uploaded", so the job is ready again instead.
	again map[uint64]struct{}
	// failing holds leased jobs whose Fail has chosen the dead letter in a
	// commit that readers may not see yet: a request for their path then
	// commits itself (and so comes after that commit) instead of answering
	// from a read transaction.
	failing map[uint64]struct{}
	// wanted holds jobs someone waits for (agentctl wait PATH), each until
	// the time its waiter must have renewed it by: Lease hands them out
	// before any other due job. wantedIDs are its ids in order (oldest
	// job first).
	wanted    map[uint64]*wantMark
	wantedIDs []uint64
	// wantedReads counts the jobs wantedDue read (for tests).
	wantedReads int

	// durable is the id of the last transaction known to be on disk,
	// attempted the id of the last one whose commit has finished, with or
	// without success; durableCh is closed (and replaced) after every
	// commit attempt.
	durableMu sync.Mutex
	durable   int
	attempted int
	durableCh chan struct{}

	// commits counts the read-write transactions the committer has
	// written (each costs bbolt's fsyncs), successful or not.
	commits atomic.Uint64

	// Test hooks: inWrite runs in a commit's transaction after its
	// operations, before it is written; afterWrite runs after a commit is
	// written and before it is recorded as durable; waitingDurable runs
	// when the already-queued shortcut waits for a commit in flight;
	// listing runs in List's read transaction for every job it reads.
	inWrite        func()
	afterWrite     func()
	waitingDurable func()
	listing        func()
}

type op struct {
	fn   func(tx *bolt.Tx) error
	done chan error // receives the outcome; buffered
	lazy bool       // may wait for the next commit (see AckAsync)
}

// lazyDelay bounds how long a lazy operation waits for company.
const lazyDelay = 50 * time.Millisecond

// Open opens (creating if needed) the queue at path. Jobs that were being
// uploaded when the previous process stopped are simply ready.
func Open(path string) (*Queue, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("open queue: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("open queue %s: %w", path, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("open queue %s: %w", path, err)
	}
	q := &Queue{
		db:     db,
		ops:    make(chan *op, 1024),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		leased: map[uint64]Job{},

		dropped:   map[uint64]struct{}{},
		again:     map[uint64]struct{}{},
		failing:   map[uint64]struct{}{},
		wanted:    map[uint64]*wantMark{},
		durableCh: make(chan struct{}),
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBkts {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		// Databases written before leases moved to memory.
		if tx.Bucket([]byte("leased")) != nil {
			return tx.DeleteBucket([]byte("leased"))
		}
		return nil
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("open queue %s: %w", path, err)
	}
	// What is in the file at open counts as durable.
	db.View(func(tx *bolt.Tx) error { q.durable, q.attempted = tx.ID(), tx.ID(); return nil })
	go q.commitLoop()
	return q, nil
}

// Close stops the committer and closes the database. Operations already
// submitted are committed first; later ones fail with ErrClosed.
func (q *Queue) Close() error {
	q.closing.Lock()
	already := q.closed
	q.closed = true
	q.closing.Unlock()
	if already {
		return ErrClosed
	}
	close(q.stop)
	<-q.done
	return q.db.Close()
}

// Commits returns how many read-write transactions the committer has
// committed (or tried to) since Open: each is one round of fsyncs, however
// many operations it carried, so concurrent enqueues cost fewer commits
// than enqueues.
func (q *Queue) Commits() uint64 { return q.commits.Load() }

// Wake returns a channel that receives a value after a commit that may have
// made a job due. Workers wait on it instead of polling.
func (q *Queue) Wake() <-chan struct{} { return q.wake }

// Poke wakes one waiter on Wake, if any.
func (q *Queue) Poke() { q.notify() }

func (q *Queue) notify() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// submit hands o to the committer, which will send its outcome on o.done,
// or returns ErrClosed.
func (q *Queue) submit(o *op) error {
	q.closing.RLock()
	defer q.closing.RUnlock()
	if q.closed {
		return ErrClosed
	}
	// Close waits for this send: the committer runs until Close has the
	// write lock, so a full channel drains.
	q.ops <- o
	return nil
}

// update runs fn in a read-write transaction shared with any other waiting
// operations, and returns once that transaction is durably committed.
func (q *Queue) update(fn func(tx *bolt.Tx) error) error {
	o := &op{fn: fn, done: make(chan error, 1)}
	if err := q.submit(o); err != nil {
		return err
	}
	return <-o.done
}

// commitLoop is the group committer. It never makes a waiting caller wait
// for company: when the writer is idle the first operation commits
// immediately, and operations that arrive during a commit are committed
// together in the next one. Lazy operations (acknowledgements of finished
// uploads, which nobody waits for) ride along with the next commit, or are
// committed on their own after lazyDelay; so a steady stream of builds costs
// one fsynced commit per hook rather than two.
func (q *Queue) commitLoop() {
	defer close(q.done)
	var lazy []*op
	var timer *time.Timer
	var timeout <-chan time.Time
	for {
		var first *op
		select {
		case first = <-q.ops:
		case <-timeout:
		case <-q.stop:
			q.drain(lazy)
			return
		}
		var batch []*op
		if first != nil {
			batch = append(batch, first)
		}
	gather:
		for len(batch) < 1000 {
			select {
			case o := <-q.ops:
				batch = append(batch, o)
			default:
				break gather
			}
		}
		urgent := false
		for _, o := range batch {
			urgent = urgent || !o.lazy
		}
		lazy = append(lazy, batch...)
		if !urgent && first != nil {
			if timeout == nil {
				timer = time.NewTimer(lazyDelay)
				timeout = timer.C
			}
			continue
		}
		if timer != nil {
			timer.Stop()
			timer, timeout = nil, nil
		}
		q.commit(lazy)
		lazy = nil
	}
}

// drain commits lazy and every operation still in ops, once Close has
// stopped new ones from coming.
func (q *Queue) drain(lazy []*op) {
	batch := lazy
	for {
		select {
		case o := <-q.ops:
			batch = append(batch, o)
			if len(batch) < 1000 {
				continue
			}
		default:
		}
		if len(batch) == 0 {
			return
		}
		q.commit(batch)
		batch = nil
	}
}

type opFailed struct {
	i   int
	err error
}

func (e *opFailed) Error() string { return e.err.Error() }

func (q *Queue) commit(batch []*op) {
	var txid int
	q.commits.Add(1)
	err := q.db.Update(func(tx *bolt.Tx) error {
		txid = tx.ID()
		for i, o := range batch {
			if err := o.fn(tx); err != nil {
				return &opFailed{i: i, err: err}
			}
		}
		if q.inWrite != nil {
			q.inWrite()
		}
		return nil
	})
	if q.afterWrite != nil {
		q.afterWrite()
	}
	q.committed(txid, err == nil)
	var failed *opFailed
	switch {
	case err == nil:
		for _, o := range batch {
			o.done <- nil
		}
		q.notify()
	case len(batch) > 1 && errors.As(err, &failed):
		// One operation failed and rolled back the whole transaction; give
		// each its own transaction so the others are not affected.
		for _, o := range batch {
			q.commit([]*op{o})
		}
	default:
		if errors.As(err, &failed) {
			err = failed.err
		}
		for _, o := range batch {
			o.done <- err
		}
	}
}

// committed records the outcome of the commit of transaction txid and
// wakes whoever waits for one.
func (q *Queue) committed(txid int, ok bool) {
	q.durableMu.Lock()
	defer q.durableMu.Unlock()
	if ok && txid > q.durable {
		q.durable = txid
	}
	q.attempted = max(q.attempted, txid)
	close(q.durableCh)
	q.durableCh = make(chan struct{})
}

// waitDurable reports whether transaction txid, which a reader saw, is on
// disk, waiting for the commit in flight if it is not known to be yet. The
// transaction a reader sees is the last one whose meta page was written:
// either its commit has finished, or it is the one in flight, so one commit
// outcome settles it. False means that commit failed (after writing its
// meta page, so that readers saw it); the caller then commits itself.
func (q *Queue) waitDurable(txid int) bool {
	q.durableMu.Lock()
	if q.durable >= txid || q.attempted >= txid {
		ok := q.durable >= txid
		q.durableMu.Unlock()
		return ok
	}
	ch := q.durableCh
	q.durableMu.Unlock()
	if q.waitingDurable != nil {
		q.waitingDurable()
	}
	select {
	case <-ch:
	case <-q.stop:
		return false
	}
	q.durableMu.Lock()
	defer q.durableMu.Unlock()
	return q.durable >= txid
}

// EnqueueResult is the job for one enqueued path and whether it was new.
type EnqueueResult struct {
	Job Job
	New bool
	// Requeued is set when the path's job was in the dead letter and this
	// request made it ready again.
	Requeued bool
}

// Enqueue adds a ready job for every path not already queued and returns
// the job for each path (the existing one for a path already queued). A
// path whose job failed is ready again, with its attempts reset (as after
// Retry; its last error is kept until it is uploaded): a new request for
// it, typically after it was built again, means it should be uploaded. A
// job requested for a derivation it does not have yet records that one too
// (Job.Derivations). It returns only after the jobs are durably committed.
// New jobs have SourceHook; EnqueueWith sets another.
func (q *Queue) Enqueue(paths []string, drv string, now time.Time) ([]EnqueueResult, error) {
	return q.EnqueueWith(paths, drv, now, EnqueueOptions{Source: SourceHook})
}

// EnqueueOptions are the optional parts of an enqueue.
type EnqueueOptions struct {
	// Source is recorded in new jobs (a job that exists keeps its own).
	Source Source
	// Mark, if set, is stored with the jobs in the same commit (see
	// GetMark): a caller that records how far it got (the store
	// watcher's cursor) never records progress whose jobs a crash lost.
	Mark *Mark
}

// Mark is a small named record a caller keeps in the queue's database.
type Mark struct {
	Name  string
	Value []byte
}

// EnqueueWith is Enqueue with options.
func (q *Queue) EnqueueWith(paths []string, drv string, now time.Time, opt EnqueueOptions) ([]EnqueueResult, error) {
	// Paths that are all queued (and not failed) already are durable
	// already: answer from a read transaction, without a commit (and its
	// two fsyncs), unless one of their jobs is being failed (or a mark
	// must be committed).
	if failing := q.noteRequestedAgain(paths); !failing && opt.Mark == nil {
		if res, ok := q.lookupAll(paths, drv); ok {
			return res, nil
		}
	}
	var res []EnqueueResult
	err := q.update(func(tx *bolt.Tx) error {
		res = res[:0] // fn may run twice if its batch is retried
		if opt.Mark != nil {
			if err := tx.Bucket(bktMeta).Put([]byte(keyMarkPfx+opt.Mark.Name), opt.Mark.Value); err != nil {
				return err
			}
		}
		for _, p := range paths {
			if idb := tx.Bucket(bktPaths).Get([]byte(p)); idb != nil {
				j, err := getJob(tx, binary.BigEndian.Uint64(idb))
				if err != nil {
					return err
				}
				if j.State != StateFailed {
					// The request is acknowledged for drv too: that must
					// outlive a crash as much as the job does.
					if j.addDrv(drv) {
						if err := putJob(tx, j); err != nil {
							return err
						}
					}
					res = append(res, EnqueueResult{Job: *j})
					continue
				}
				if err := leaveState(tx, j); err != nil {
					return err
				}
				j.State, j.Attempts, j.NotBefore = StateReady, 0, now.UTC()
				if drv != "" && drv != j.Drv {
					// The new request's derivation comes first; the
					// earlier ones are kept.
					j.Drvs = slices.DeleteFunc(j.Drvs, func(d string) bool { return d == drv })
					if j.Drv != "" {
						j.Drvs = append(j.Drvs, j.Drv)
					}
					j.Drv = drv
				}
				if err := putJob(tx, j); err != nil {
					return err
				}
				if err := enterState(tx, j); err != nil {
					return err
				}
				res = append(res, EnqueueResult{Job: *j, Requeued: true})
				continue
			}
			id, err := tx.Bucket(bktJobs).NextSequence()
			if err != nil {
				return err
			}
			j := &Job{ID: id, Path: p, Drv: drv, State: StateReady, EnqueuedAt: now.UTC(), NotBefore: now.UTC(), Source: opt.Source}
			if err := putJob(tx, j); err != nil {
				return err
			}
			if err := countSource(tx, j.Source, 1); err != nil {
				return err
			}
			if err := tx.Bucket(bktPaths).Put([]byte(p), be64(id)); err != nil {
				return err
			}
			if err := enterState(tx, j); err != nil {
				return err
			}
			res = append(res, EnqueueResult{Job: *j, New: true})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("enqueue: %w", err)
	}
	return res, nil
}

// lookupAll returns the jobs of paths if every one of them is queued, in a
// state Enqueue would not change (not failed, drv recorded), by a durable
// commit.
func (q *Queue) lookupAll(paths []string, drv string) ([]EnqueueResult, bool) {
	var res []EnqueueResult
	ok := true
	var txid int
	q.db.View(func(tx *bolt.Tx) error {
		txid = tx.ID()
		for _, p := range paths {
			idb := tx.Bucket(bktPaths).Get([]byte(p))
			if idb == nil {
				ok = false
				return nil
			}
			j, err := getJob(tx, binary.BigEndian.Uint64(idb))
			if err != nil || j.State == StateFailed || (drv != "" && !slices.Contains(j.Derivations(), drv)) {
				ok = false
				return nil
			}
			res = append(res, EnqueueResult{Job: *j})
		}
		return nil
	})
	if !ok || len(res) == 0 {
		return nil, false
	}
	// The jobs may come from a commit whose fsync has not finished.
	return res, q.waitDurable(txid)
}

// Lease hands out the first ready job that is due at now and not already
// leased, or returns nil if there is none. The lease is held in memory
// until Ack, RetryLater, Fail or Release.
func (q *Queue) Lease(now time.Time) (*Job, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var leased *Job
	err := q.db.View(func(tx *bolt.Tx) error {
		if j, err := q.wantedDue(tx, now); err != nil || j != nil {
			leased = j
			return err
		}
		c := tx.Bucket(bktReady).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			if int64(binary.BigEndian.Uint64(k[:8])) > now.UnixNano() {
				return nil
			}
			id := binary.BigEndian.Uint64(k[8:])
			if _, busy := q.leased[id]; busy {
				continue
			}
			j, err := getJob(tx, id)
			if err != nil {
				return err
			}
			leased = j
			return nil
		}
		return nil
	})
	if err != nil || leased == nil {
		return nil, err
	}
	q.leased[leased.ID] = *leased
	leased.State = StateLeased
	return leased, nil
}

// Want marks the jobs ids as waited for until until: Lease hands them out
// before other due jobs (oldest first) while the mark holds. A waiter
// renews it while it waits; a mark that is not renewed lapses, and one on a
// job that is no longer ready (done, failed, dropped) goes at the next
// Lease. Nothing of it is durable.
func (q *Queue) Want(ids []uint64, until time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, id := range ids {
		if m, ok := q.wanted[id]; ok {
			if until.After(m.until) {
				m.until = until
			}
			continue
		}
		q.wanted[id] = &wantMark{until: until}
		i, _ := slices.BinarySearch(q.wantedIDs, id)
		q.wantedIDs = slices.Insert(q.wantedIDs, i, id)
	}
}

// wantMark is one job someone waits for.
type wantMark struct {
	until time.Time // the mark lapses then unless renewed
	// notBefore is the job's NotBefore as last read, while it is ready:
	// until then it is not due, and is not read again. A lease of the job
	// (after which it may change) clears it.
	notBefore time.Time
}

// unwant forgets the mark of job id. q.mu is held.
func (q *Queue) unwant(id uint64) {
	if _, ok := q.wanted[id]; !ok {
		return
	}
	delete(q.wanted, id)
	if i, found := slices.BinarySearch(q.wantedIDs, id); found {
		q.wantedIDs = slices.Delete(q.wantedIDs, i, i+1)
	}
}

// Wanted returns how many jobs are marked as waited for now.
func (q *Queue) Wanted(now time.Time) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, m := range q.wanted {
		if !m.until.Before(now) {
			n++
		}
	}
	return n
}

// wantedDue returns the oldest waited-for job that is due at now and not
// leased (nil if none), and forgets the marks that lapsed or whose job is
// no longer ready. A job known to be backing off is skipped without being
// read: a lease reads each waited-for job at most once while it waits out
// a backoff. q.mu is held.
func (q *Queue) wantedDue(tx *bolt.Tx, now time.Time) (*Job, error) {
	var gone []uint64
	defer func() {
		for _, id := range gone {
			q.unwant(id)
		}
	}()
	for _, id := range q.wantedIDs {
		m := q.wanted[id]
		if m.until.Before(now) {
			gone = append(gone, id)
			continue
		}
		if _, busy := q.leased[id]; busy || m.notBefore.After(now) {
			continue // backing off: a wait does not hurry a retry
		}
		q.wantedReads++
		j, err := getJob(tx, id)
		if errors.Is(err, ErrNotFound) {
			gone = append(gone, id)
			continue
		}
		if err != nil {
			return nil, err
		}
		if j.State != StateReady {
			gone = append(gone, id)
			continue
		}
		if j.NotBefore.After(now) {
			m.notBefore = j.NotBefore
			continue
		}
		return j, nil
	}
	return nil, nil
}

// unlease ends the in-memory lease of id, after its outcome. A drop that
// came in while the outcome was being recorded is forgotten too: that
// outcome was the lease's last word.
func (q *Queue) unlease(id uint64) {
	q.mu.Lock()
	q.forget(id)
	delete(q.dropped, id)
	q.mu.Unlock()
}

// forget removes what is kept in memory about the lease of id. q.mu is held.
func (q *Queue) forget(id uint64) {
	if m, ok := q.wanted[id]; ok {
		m.notBefore = time.Time{} // the outcome may have changed it
	}
	delete(q.leased, id)
	delete(q.again, id)
	delete(q.failing, id)
}

// noteRequestedAgain marks the leased jobs of paths as requested again
// (before the request is answered, so that no outcome can slip between).
// It reports whether Fail has already chosen the dead letter for one of
// them: then the request must be answered by a commit of its own, which
// follows that Fail's and finds the job failed.
func (q *Queue) noteRequestedAgain(paths []string) (failing bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.leased) == 0 {
		return false
	}
	want := make(map[string]bool, len(paths))
	for _, p := range paths {
		want[p] = true
	}
	for id, j := range q.leased {
		if want[j.Path] {
			q.again[id] = struct{}{}
			if _, ok := q.failing[id]; ok {
				failing = true
			}
		}
	}
	return failing
}

// requeueOnFail reports whether a permanent failure of leased job id must
// leave it ready, because its path was requested again during the attempt;
// otherwise it marks the job as failing. Fail calls it inside its commit,
// so that every request is either noted before (and requeues the job) or
// sees the mark (and commits after the failure, requeueing the job then).
func (q *Queue) requeueOnFail(id uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, ok := q.again[id]; ok {
		return true
	}
	q.failing[id] = struct{}{}
	return false
}

func (q *Queue) isLeased(id uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	_, ok := q.leased[id]
	return ok
}

// IsLeased reports whether job id is leased now (false once it was dropped).
func (q *Queue) IsLeased(id uint64) bool { return q.isLeased(id) }

// wasDropped reports (once) whether job id was dropped while it was leased.
func (q *Queue) wasDropped(id uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	_, ok := q.dropped[id]
	delete(q.dropped, id)
	return ok
}

// NextDue returns when the earliest ready job becomes due; ok is false when
// no job is ready.
func (q *Queue) NextDue() (due time.Time, ok bool, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	err = q.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bktReady).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			if _, busy := q.leased[binary.BigEndian.Uint64(k[8:])]; !busy {
				due, ok = time.Unix(0, int64(binary.BigEndian.Uint64(k[:8]))), true
				return nil
			}
		}
		return nil
	})
	return due, ok, err
}

// Totals are what one finished job adds to the upload counters.
type Totals struct {
	Paths     uint64 // paths uploaded (the job's path and missing dependencies)
	NARBytes  uint64
	FileBytes uint64
	Skipped   uint64 // paths left out by a filter
	// Realisations counts realisation objects written (CA derivations).
	Realisations uint64
}

// Ack removes a leased job after its path was uploaded, and adds to the
// upload totals. A job dropped while it was leased is not an error. A job
// whose path was requested for a derivation it did not have when it was
// leased stays ready for the derivations added since (their realisations
// may not have been written): the request for them was acknowledged, and
// the job is its only durable record.
func (q *Queue) Ack(id uint64, t Totals) error {
	done := make(chan error, 1)
	q.AckAsync(id, t, func(err error) { done <- err })
	return <-done
}

// AckAsync is Ack without waiting: the removal is committed with the next
// commit (at most lazyDelay later) and then, when given, after is called
// with the outcome. The job stays leased (never handed out again) until
// then. Losing the acknowledgement in a crash only means the path is
// checked again, and found present, after the restart.
func (q *Queue) AckAsync(id uint64, t Totals, after func(error)) {
	if !q.isLeased(id) {
		var err error
		if !q.wasDropped(id) {
			err = fmt.Errorf("job %d is not leased: %w", id, ErrState)
		}
		if after != nil {
			after(err)
		}
		return
	}
	q.mu.Lock()
	leasedJob := q.leased[id]
	q.mu.Unlock()
	leasedDrvs := leasedJob.Derivations()
	var kept bool
	o := &op{fn: ackFn(id, t, leasedDrvs, &kept), done: make(chan error, 1), lazy: true}
	go func() {
		err := <-o.done
		q.unlease(id)
		if err == nil && kept {
			q.notify() // the job is due again, and no longer leased
		}
		if after != nil {
			after(err)
		}
	}()
	if err := q.submit(o); err != nil {
		o.done <- err
	}
}

// ackFn removes job id, leased for the derivations leasedDrvs, or keeps it
// ready for those it was requested for since (setting *kept).
func ackFn(id uint64, t Totals, leasedDrvs []string, kept *bool) func(tx *bolt.Tx) error {
	return func(tx *bolt.Tx) error {
		*kept = false // fn may run twice if its batch is retried
		j, err := getJob(tx, id)
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if late := lateDerivations(j, leasedDrvs); len(late) > 0 {
			if err := leaveState(tx, j); err != nil {
				return err
			}
			j.Drv, j.Drvs = late[0], late[1:]
			j.Attempts, j.LastError = 0, ""
			if err := putJob(tx, j); err != nil {
				return err
			}
			if err := enterState(tx, j); err != nil {
				return err
			}
			*kept = true
		} else if err := removeJob(tx, j); err != nil {
			return err
		}
		m := tx.Bucket(bktMeta)
		for k, v := range map[string]uint64{cntUploaded: 1, cntNARBytes: t.NARBytes, cntFileBytes: t.FileBytes, cntSkipped: t.Skipped, cntPaths: t.Paths, cntReals: t.Realisations} {
			if err := addCounter(m, k, int64(v)); err != nil {
				return err
			}
		}
		return nil
	}
}

// lateDerivations returns the derivations of j that are not in leasedDrvs.
func lateDerivations(j *Job, leasedDrvs []string) []string {
	var late []string
	for _, d := range j.Derivations() {
		if !slices.Contains(leasedDrvs, d) {
			late = append(late, d)
		}
	}
	return late
}

// RetryLater returns a leased job to ready, due at notBefore, counting one
// more attempt and recording reason as its last error.
func (q *Queue) RetryLater(id uint64, notBefore time.Time, reason string, now time.Time) error {
	return q.transition(id, StateLeased, func(j *Job) {
		j.State, j.Attempts, j.NotBefore, j.LastError = StateReady, j.Attempts+1, notBefore.UTC(), reason
	}, reason, now)
}

// ErrRequeued is returned by Fail for a job whose path was requested again
// during the failed attempt: the job is ready again, attempts reset.
var ErrRequeued = errors.New("requested again during the attempt; queued again")

// Fail moves a leased job to the dead letter with reason, unless its path
// was requested again while it was being uploaded: then the job is ready
// again with its attempts reset (the new request means "will be uploaded",
// as for a failed job requested again), and Fail returns ErrRequeued.
func (q *Queue) Fail(id uint64, reason string, now time.Time) error {
	requeued := false
	err := q.transition(id, StateLeased, func(j *Job) {
		// Runs in the commit (again if its batch is retried).
		requeued = q.requeueOnFail(id)
		if requeued {
			j.State, j.Attempts, j.NotBefore, j.LastError = StateReady, 0, now.UTC(), reason
			return
		}
		j.State, j.Attempts, j.LastError = StateFailed, j.Attempts+1, reason
	}, reason, now)
	if err == nil && requeued {
		return ErrRequeued
	}
	return err
}

// Release ends a lease without an outcome (agentd is shutting down during
// the upload, or the job was dropped): the job is ready again, with nothing
// to commit.
func (q *Queue) Release(id uint64) error {
	if !q.isLeased(id) {
		if q.wasDropped(id) {
			return nil
		}
		return fmt.Errorf("job %d is not leased: %w", id, ErrState)
	}
	q.unlease(id)
	q.notify()
	return nil
}

// Retry moves a failed job back to ready with its attempts reset.
func (q *Queue) Retry(id uint64, now time.Time) error {
	return q.transition(id, StateFailed, func(j *Job) {
		j.State, j.Attempts, j.NotBefore = StateReady, 0, now.UTC()
	}, "", now)
}

// RetryAll moves every failed job back to ready and returns how many moved.
func (q *Queue) RetryAll(now time.Time) (int, error) {
	var n int
	err := q.update(func(tx *bolt.Tx) error {
		n = 0
		var ids []uint64
		if err := tx.Bucket(bktFailed).ForEach(func(k, _ []byte) error {
			ids = append(ids, binary.BigEndian.Uint64(k))
			return nil
		}); err != nil {
			return err
		}
		for _, id := range ids {
			j, err := getJob(tx, id)
			if err != nil {
				return err
			}
			if err := leaveState(tx, j); err != nil {
				return err
			}
			j.State, j.Attempts, j.NotBefore = StateReady, 0, now.UTC()
			if err := putJob(tx, j); err != nil {
				return err
			}
			if err := enterState(tx, j); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	return n, err
}

// Drop removes a job in any state and returns it. A job dropped while it
// is leased is no longer leased; the outcome its worker reports later (Ack,
// RetryLater, Fail, Release), or is reporting meanwhile, is accepted
// without error and changes nothing.
func (q *Queue) Drop(id uint64) (*Job, error) {
	var dropped *Job
	err := q.update(func(tx *bolt.Tx) error {
		j, err := getJob(tx, id)
		if err != nil {
			return err
		}
		dropped = j
		return removeJob(tx, j)
	})
	if err == nil {
		q.mu.Lock()
		if _, ok := q.leased[id]; ok {
			q.forget(id)
			q.dropped[id] = struct{}{}
			dropped.State = StateLeased
		}
		q.mu.Unlock()
	}
	return dropped, err
}

func (q *Queue) transition(id uint64, from State, change func(*Job), reason string, now time.Time) error {
	diskFrom := from
	if from == StateLeased {
		if !q.isLeased(id) {
			if q.wasDropped(id) {
				return nil
			}
			return fmt.Errorf("job %d is not leased: %w", id, ErrState)
		}
		defer q.unlease(id)
		diskFrom = StateReady
	}
	return q.update(func(tx *bolt.Tx) error {
		j, err := getJob(tx, id)
		if errors.Is(err, ErrNotFound) && from == StateLeased {
			return nil // dropped since the check: nothing left to record
		}
		if err != nil {
			return err
		}
		if j.State != diskFrom {
			return fmt.Errorf("job %d is %s, not %s: %w", id, j.State, from, ErrState)
		}
		if err := leaveState(tx, j); err != nil {
			return err
		}
		change(j)
		if err := putJob(tx, j); err != nil {
			return err
		}
		if reason != "" {
			m := tx.Bucket(bktMeta)
			if err := m.Put([]byte(keyLastErr), []byte(reason)); err != nil {
				return err
			}
			if err := m.Put([]byte(keyLastErrAt), be64(uint64(now.Unix()))); err != nil {
				return err
			}
		}
		return enterState(tx, j)
	})
}

// Queued reports whether path has a job (in any state, failed included).
func (q *Queue) Queued(path string) (bool, error) {
	var ok bool
	err := q.db.View(func(tx *bolt.Tx) error {
		ok = tx.Bucket(bktPaths).Get([]byte(path)) != nil
		return nil
	})
	return ok, err
}

// Lookup returns the jobs of those of paths that have one (in any state,
// leased included), by path.
func (q *Queue) Lookup(paths []string) (map[string]Job, error) {
	out := map[string]Job{}
	q.mu.Lock()
	defer q.mu.Unlock()
	err := q.db.View(func(tx *bolt.Tx) error {
		for _, p := range paths {
			idb := tx.Bucket(bktPaths).Get([]byte(p))
			if idb == nil {
				continue
			}
			j, err := getJob(tx, binary.BigEndian.Uint64(idb))
			if err != nil {
				return err
			}
			if _, busy := q.leased[j.ID]; busy {
				j.State = StateLeased
			}
			out[p] = *j
		}
		return nil
	})
	return out, err
}

// Get returns one job.
func (q *Queue) Get(id uint64) (*Job, error) {
	var j *Job
	err := q.db.View(func(tx *bolt.Tx) (err error) {
		j, err = getJob(tx, id)
		return err
	})
	if err == nil && q.isLeased(id) {
		j.State = StateLeased
	}
	return j, err
}

// List returns up to limit jobs in state (all states if state is ""), in
// id order.
func (q *Queue) List(state State, limit int) ([]Job, error) {
	return q.ListBy(state, nil, limit)
}

// ListBy is List that also keeps only jobs from source, if source is not
// nil.
func (q *Queue) ListBy(state State, source *Source, limit int) ([]Job, error) {
	var out []Job
	// The scan reads every job: it runs in a read transaction of its own,
	// without q.mu, so that leases and commits do not wait for it. Leases
	// are those of the moment it starts.
	q.mu.Lock()
	leased := make(map[uint64]bool, len(q.leased))
	for id := range q.leased {
		leased[id] = true
	}
	q.mu.Unlock()
	err := q.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bktJobs).Cursor()
		for k, v := c.First(); k != nil && len(out) < limit; k, v = c.Next() {
			if q.listing != nil {
				q.listing()
			}
			j, err := decodeJob(v)
			if err != nil {
				return err
			}
			j.ID = binary.BigEndian.Uint64(k)
			if leased[j.ID] {
				j.State = StateLeased
			}
			if (state == "" || j.State == state) && (source == nil || j.Source == *source) {
				out = append(out, *j)
			}
		}
		return nil
	})
	return out, err
}

// Stats are the queue's counters.
type Stats struct {
	Pending, Retrying, Leased, Failed int
	Uploaded, NARBytes, FileBytes     uint64
	Paths, Skipped                    uint64    // store paths uploaded (jobs and dependencies); paths filtered out
	Realisations                      uint64    // realisation objects written
	OldestActive                      time.Time // zero if nothing is ready or leased
	OldestActiveID, NewestID          uint64    // id of the oldest ready job (0 if none); last id assigned
	NextRetry                         time.Time // earliest not-before of a retrying job, if any
	// BySource counts the queued jobs (any state) by where they came
	// from; sources with none are left out.
	BySource    map[Source]int
	LastError   string
	LastErrorAt time.Time
}

// Stats returns the counters without scanning the queue.
func (q *Queue) Stats() (Stats, error) {
	var s Stats
	// Snapshot the leases first: q.mu must never be taken inside a read
	// transaction. Lease takes q.mu and then opens one; a reader waiting
	// for q.mu while holding bbolt's mmap read lock would deadlock with a
	// writer that needs to grow the file.
	var leasedFresh, leasedRetrying int
	q.mu.Lock()
	for _, j := range q.leased {
		if j.Attempts > 0 {
			leasedRetrying++
		} else {
			leasedFresh++
		}
	}
	q.mu.Unlock()
	err := q.db.View(func(tx *bolt.Tx) error {
		m := tx.Bucket(bktMeta)
		// A lease whose ack just committed is briefly counted twice.
		s.Pending = max(int(counter(m, cntPending))-leasedFresh, 0)
		s.Retrying = max(int(counter(m, cntRetrying))-leasedRetrying, 0)
		s.Leased = leasedFresh + leasedRetrying
		s.Failed = int(counter(m, cntFailed))
		s.Uploaded = uint64(counter(m, cntUploaded))
		s.NARBytes = uint64(counter(m, cntNARBytes))
		s.FileBytes = uint64(counter(m, cntFileBytes))
		s.Paths = uint64(counter(m, cntPaths))
		s.Skipped = uint64(counter(m, cntSkipped))
		s.Realisations = uint64(counter(m, cntReals))
		s.LastError = string(m.Get([]byte(keyLastErr)))
		if v := m.Get([]byte(keyLastErrAt)); len(v) == 8 {
			s.LastErrorAt = time.Unix(int64(binary.BigEndian.Uint64(v)), 0)
		}
		if k, _ := tx.Bucket(bktActive).Cursor().First(); k != nil {
			j, err := getJob(tx, binary.BigEndian.Uint64(k))
			if err != nil {
				return err
			}
			s.OldestActive = j.EnqueuedAt
			s.OldestActiveID = j.ID
		}
		s.NewestID = tx.Bucket(bktJobs).Sequence()
		s.BySource = map[Source]int{}
		total := int(counter(m, cntPending) + counter(m, cntRetrying) + counter(m, cntFailed))
		for _, src := range Sources {
			if src == SourceUnknown {
				continue
			}
			if n := int(counter(m, cntSourcePfx+string(src))); n > 0 {
				s.BySource[src] = n
				total -= n
			}
		}
		if total > 0 {
			s.BySource[SourceUnknown] = total
		}
		if s.Retrying > 0 {
			// The first ready key is the earliest due job; if it is a retry
			// that is the next retry time. Good enough for display.
			if k, _ := tx.Bucket(bktReady).Cursor().First(); k != nil {
				s.NextRetry = time.Unix(0, int64(binary.BigEndian.Uint64(k[:8])))
			}
		}
		return nil
	})
	return s, err
}

func counterKey(j *Job) string {
	switch j.State {
	case StateReady:
		if j.Attempts > 0 {
			return cntRetrying
		}
		return cntPending
	default:
		return cntFailed
	}
}

// enterState adds j to the index of its state and counts it.
func enterState(tx *bolt.Tx, j *Job) error {
	id := be64(j.ID)
	var err error
	switch j.State {
	case StateReady:
		err = tx.Bucket(bktReady).Put(readyKey(j), nil)
		if err == nil {
			err = tx.Bucket(bktActive).Put(id, nil)
		}
	case StateFailed:
		err = tx.Bucket(bktFailed).Put(id, nil)
	default:
		err = fmt.Errorf("job %d: unknown state %q", j.ID, j.State)
	}
	if err != nil {
		return err
	}
	return addCounter(tx.Bucket(bktMeta), counterKey(j), 1)
}

// leaveState removes j from the index of its (current) state.
func leaveState(tx *bolt.Tx, j *Job) error {
	id := be64(j.ID)
	var err error
	switch j.State {
	case StateReady:
		err = tx.Bucket(bktReady).Delete(readyKey(j))
		if err == nil {
			err = tx.Bucket(bktActive).Delete(id)
		}
	case StateFailed:
		err = tx.Bucket(bktFailed).Delete(id)
	}
	if err != nil {
		return err
	}
	return addCounter(tx.Bucket(bktMeta), counterKey(j), -1)
}

func removeJob(tx *bolt.Tx, j *Job) error {
	if err := leaveState(tx, j); err != nil {
		return err
	}
	if err := countSource(tx, j.Source, -1); err != nil {
		return err
	}
	if err := tx.Bucket(bktPaths).Delete([]byte(j.Path)); err != nil {
		return err
	}
	return tx.Bucket(bktJobs).Delete(be64(j.ID))
}

// countSource adds d to the count of queued jobs from source. Jobs of
// SourceUnknown are not counted: databases written before sources were
// recorded hold such jobs without a counter (Stats derives their number).
func countSource(tx *bolt.Tx, source Source, d int64) error {
	if source == SourceUnknown {
		return nil
	}
	return addCounter(tx.Bucket(bktMeta), cntSourcePfx+string(source), d)
}

// GetMark returns the record named name (nil if there is none).
func (q *Queue) GetMark(name string) ([]byte, error) {
	var v []byte
	err := q.db.View(func(tx *bolt.Tx) error {
		v = bytes.Clone(tx.Bucket(bktMeta).Get([]byte(keyMarkPfx + name)))
		return nil
	})
	return v, err
}

// SetMark durably stores the record named name.
func (q *Queue) SetMark(name string, value []byte) error {
	return q.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bktMeta).Put([]byte(keyMarkPfx+name), value)
	})
}

func readyKey(j *Job) []byte {
	k := make([]byte, 16)
	binary.BigEndian.PutUint64(k, uint64(j.NotBefore.UnixNano()))
	binary.BigEndian.PutUint64(k[8:], j.ID)
	return k
}

func getJob(tx *bolt.Tx, id uint64) (*Job, error) {
	v := tx.Bucket(bktJobs).Get(be64(id))
	if v == nil {
		return nil, fmt.Errorf("job %d: %w", id, ErrNotFound)
	}
	j, err := decodeJob(v)
	if err != nil {
		return nil, fmt.Errorf("job %d: %w", id, err)
	}
	j.ID = id
	return j, nil
}

func putJob(tx *bolt.Tx, j *Job) error {
	v, err := encodeJob(j)
	if err != nil {
		return err
	}
	return tx.Bucket(bktJobs).Put(be64(j.ID), v)
}

func encodeJob(j *Job) ([]byte, error) {
	b, err := json.Marshal(j)
	if err != nil {
		return nil, err
	}
	return append([]byte{recordVersion}, b...), nil
}

// decodeJob decodes a record. It copies nothing out of v it keeps, so v may
// be a bbolt value that is only valid inside the transaction.
func decodeJob(v []byte) (*Job, error) {
	if len(v) == 0 {
		return nil, errors.New("empty job record")
	}
	if v[0] != recordVersion {
		return nil, fmt.Errorf("job record version %d not supported (want %d)", v[0], recordVersion)
	}
	var j Job
	if err := json.Unmarshal(v[1:], &j); err != nil {
		return nil, fmt.Errorf("decode job record: %w", err)
	}
	return &j, nil
}

func be64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func counter(m *bolt.Bucket, k string) int64 {
	v := m.Get([]byte(k))
	if len(v) != 8 {
		return 0
	}
	return int64(binary.BigEndian.Uint64(v))
}

func addCounter(m *bolt.Bucket, k string, d int64) error {
	return m.Put([]byte(k), be64(uint64(counter(m, k)+d)))
}

// SaveUpload durably stores the resume record of a large upload of path
// (opaque to the queue).
func (q *Queue) SaveUpload(path string, record []byte) error {
	return q.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bktUploads).Put([]byte(path), record)
	})
}

// LoadUpload returns the resume record of path, or nil.
func (q *Queue) LoadUpload(path string) ([]byte, error) {
	var rec []byte
	err := q.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bktUploads).Get([]byte(path)); v != nil {
			rec = bytes.Clone(v)
		}
		return nil
	})
	return rec, err
}

// DeleteUpload removes the resume record of path.
func (q *Queue) DeleteUpload(path string) error {
	return q.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bktUploads).Delete([]byte(path))
	})
}

// Uploads returns every resume record, by store path.
func (q *Queue) Uploads() (map[string][]byte, error) {
	out := map[string][]byte{}
	err := q.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bktUploads).ForEach(func(k, v []byte) error {
			out[string(k)] = bytes.Clone(v)
			return nil
		})
	})
	return out, err
}

// AddPresent records that paths have narinfos in the cache with the given
// identity. It does not wait: the records ride along with the next commit.
func (q *Queue) AddPresent(identity string, paths []string, now time.Time) {
	if len(paths) == 0 {
		return
	}
	ts := be64(uint64(now.Unix()))
	o := &op{done: make(chan error, 1), lazy: true, fn: func(tx *bolt.Tx) error {
		b, err := tx.Bucket(bktPresence).CreateBucketIfNotExists([]byte(identity))
		if err != nil {
			return err
		}
		for _, p := range paths {
			if err := b.Put([]byte(p), ts); err != nil {
				return err
			}
		}
		return nil
	}}
	q.submit(o) // a closed queue forgets them, as a crash would
}

// Present returns the paths recorded as present in the cache with the
// given identity since notBefore, with the time each was recorded.
func (q *Queue) Present(identity string, notBefore time.Time) (map[string]time.Time, error) {
	out := map[string]time.Time{}
	err := q.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktPresence).Bucket([]byte(identity))
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			if len(v) != 8 {
				return nil
			}
			if at := int64(binary.BigEndian.Uint64(v)); at >= notBefore.Unix() {
				out[string(k)] = time.Unix(at, 0)
			}
			return nil
		})
	})
	return out, err
}

// ForgetPresent drops the presence records of a cache.
func (q *Queue) ForgetPresent(identity string) error {
	return q.update(func(tx *bolt.Tx) error {
		err := tx.Bucket(bktPresence).DeleteBucket([]byte(identity))
		if errors.Is(err, bolterrors.ErrBucketNotFound) {
			return nil
		}
		return err
	})
}

// PrunePresent deletes presence records older than notBefore, and every
// identity that starts with prefix other than keep (earlier generations of
// the same cache). It returns how many records went.
func (q *Queue) PrunePresent(prefix, keep string, notBefore time.Time) (int, error) {
	n := 0
	err := q.update(func(tx *bolt.Tx) error {
		n = 0
		top := tx.Bucket(bktPresence)
		var drop [][]byte
		err := top.ForEachBucket(func(name []byte) error {
			id := string(name)
			if id != keep && strings.HasPrefix(id, prefix) {
				drop = append(drop, bytes.Clone(name))
				return nil
			}
			b := top.Bucket(name)
			var old [][]byte
			if err := b.ForEach(func(k, v []byte) error {
				if len(v) != 8 || int64(binary.BigEndian.Uint64(v)) < notBefore.Unix() {
					old = append(old, bytes.Clone(k))
				}
				return nil
			}); err != nil {
				return err
			}
			for _, k := range old {
				if err := b.Delete(k); err != nil {
					return err
				}
			}
			n += len(old)
			return nil
		})
		if err != nil {
			return err
		}
		for _, name := range drop {
			n += top.Bucket(name).Stats().KeyN
			if err := top.DeleteBucket(name); err != nil {
				return err
			}
		}
		return nil
	})
	return n, err
}
