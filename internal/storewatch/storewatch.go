// Package storewatch finds the paths that became valid in the local Nix
// store, whoever added them (a build, a substitution, nix-store --add, an
// evaluation's sources, nix copy --from, nix-store --import), in the order
// they did, from a cursor that survives restarts.
//
// It reads Nix's own database (/nix/var/nix/db/db.sqlite) read-only. Every
// valid path is a row of its ValidPaths table, whose id is an AUTOINCREMENT
// key: SQLite hands out ids in commit order and never reuses one, so "the
// rows with an id above the cursor" is exactly "what became valid since",
// and the largest id handed out (the table's row in sqlite_sequence) says
// in one tiny query whether anything did. An idle cycle is that one query;
// a busy one adds one search of the primary key per batch. The Nix
// daemon's protocol has no such question: the nearest, QueryAllValidPaths,
// returns the whole store every time (O(store) per cycle, and a diff
// against the previous answer kept in memory).
//
// Nix owns the database and its schema. The schema's version is in the
// file "schema" beside it (10 from Nix 2.0 to this day); Open refuses any
// other version with an error that says so, rather than guess at a layout
// it does not know, and the watcher stays off until agentd supports it.
// The database is opened read-only (mode=ro, query_only), never written
// (though SQLite maps the -shm file of a WAL database read-write, so the
// directory must not be a read-only mount),
// with a busy timeout so that a writer holding its lock delays a read
// instead of failing it. A database that was replaced (a new file) is
// reopened; one whose numbering restarted below the cursor (a store wiped
// and rebuilt) is read again from the start (Batch.Reset).
package storewatch

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	_ "modernc.org/sqlite" // pure Go SQLite: no cgo in agentd
)

// DefaultDir is where Nix keeps its database.
const DefaultDir = "/nix/var/nix/db"

// SupportedSchema is the version of Nix's database schema this package
// reads.
const SupportedSchema = 10

// ErrSchema is returned by Open for a database whose schema version is not
// SupportedSchema.
var ErrSchema = errors.New("unsupported Nix database schema")

// Path is one valid store path, as Nix registered it.
type Path struct {
	ID         int64 // its row: larger ids became valid later
	Path       string
	Registered time.Time
	Deriver    string
	// Ultimate is set for paths built or added on this machine (Nix
	// trusts them without a signature); substituted and imported paths
	// have it unset.
	Ultimate bool
	Sigs     []string
	CA       string // content address, e.g. "fixed:r:sha256:…", "text:sha256:…"
}

// Local reports whether the path was made on this machine: built here
// (Ultimate), or added here as content-addressed and unsigned (nix-store
// --add and the sources an evaluation copies in are registered with a
// content address, no signature, and, in Nix 2.8, without Ultimate).
// A content-addressed path substituted from a cache that did not sign it
// counts as local too; its content address is its proof either way.
func (p Path) Local() bool { return p.Ultimate || (p.CA != "" && len(p.Sigs) == 0) }

// SignedBy reports whether one of the path's signatures is by one of the
// key names in names.
func (p Path) SignedBy(names map[string]bool) bool {
	for _, s := range p.Sigs {
		if name, _, ok := strings.Cut(s, ":"); ok && names[name] {
			return true
		}
	}
	return false
}

// Batch is the outcome of one Read.
type Batch struct {
	Paths []Path // rows after the cursor, oldest first
	// Next is the cursor to store once Paths are dealt with.
	Next int64
	// More: rows wait after Next (the batch was cut at its limit).
	More bool
	// Reset: the database's numbering is below the cursor (it was wiped
	// and rebuilt); Paths start again from its beginning.
	Reset bool
}

// DB is Nix's database, open read-only.
type DB struct {
	dir, file string
	db        *sql.DB
	ino       uint64 // the file's inode when opened
	queries   atomic.Int64
}

// Open checks the schema version in dir and opens its database read-only.
func Open(dir string) (*DB, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "schema"))
	if err != nil {
		return nil, fmt.Errorf("nix database: %w", err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		return nil, fmt.Errorf("nix database: schema file %s: %q is not a version number", filepath.Join(dir, "schema"), raw)
	}
	if v != SupportedSchema {
		return nil, fmt.Errorf("nix database %s has schema version %d, this agentd reads version %d only: %w", dir, v, SupportedSchema, ErrSchema)
	}
	d := &DB{dir: dir, file: filepath.Join(dir, "db.sqlite")}
	if err := d.open(); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *DB) open() error {
	var st syscall.Stat_t
	if err := syscall.Stat(d.file, &st); err != nil {
		return fmt.Errorf("nix database: %w", &os.PathError{Op: "stat", Path: d.file, Err: err})
	}
	// mode=ro: never a write, not even a journal; query_only refuses
	// anything but reads on this connection; the busy timeout waits out a
	// writer's lock instead of failing.
	dsn := "file:" + d.file + "?mode=ro&_pragma=busy_timeout(10000)&_pragma=query_only(1)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return fmt.Errorf("nix database %s: %w", d.file, err)
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	if _, err := db.Exec("SELECT 1 FROM sqlite_master LIMIT 1"); err != nil {
		db.Close()
		return fmt.Errorf("nix database %s: cannot read it: %w (a reader of a WAL database needs write access to the db.sqlite-shm file beside it, even read-only: under systemd's ProtectSystem=strict, add ReadWritePaths=%s)", d.file, err, d.dir)
	}
	// The table must be the one this package knows: a query naming every
	// column it reads fails here, not later.
	if _, err := db.Exec("SELECT id, path, registrationTime, deriver, ultimate, sigs, ca FROM ValidPaths WHERE id < 0"); err != nil {
		db.Close()
		return fmt.Errorf("nix database %s: ValidPaths is not as schema %d has it: %w", d.file, SupportedSchema, err)
	}
	d.db, d.ino = db, st.Ino
	return nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// File is the database file read.
func (d *DB) File() string { return d.file }

// Queries is how many queries the database has been sent (for tests and
// benchmarks of the idle cost).
func (d *DB) Queries() int64 { return d.queries.Load() }

// reopenIfReplaced reopens the database if its file is not the one open
// (Nix, or an operator, replaced it).
func (d *DB) reopenIfReplaced() error {
	var st syscall.Stat_t
	if err := syscall.Stat(d.file, &st); err != nil {
		return fmt.Errorf("nix database: %w", &os.PathError{Op: "stat", Path: d.file, Err: err})
	}
	if st.Ino == d.ino {
		return nil
	}
	old := d.db
	if err := d.open(); err != nil {
		return err
	}
	old.Close()
	return nil
}

// Last returns the id of the last path that became valid (0 for an empty
// store): a cursor there reads only what comes later.
func (d *DB) Last(ctx context.Context) (int64, error) {
	if err := d.reopenIfReplaced(); err != nil {
		return 0, err
	}
	var high int64
	d.queries.Add(1)
	err := d.db.QueryRowContext(ctx, "SELECT seq FROM sqlite_sequence WHERE name = 'ValidPaths'").Scan(&high)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("nix database: last id: %w", err)
	}
	return high, nil
}

// Read returns up to limit paths that became valid after cursor (a
// Batch.Next of an earlier Read; 0 for the whole store), in one read
// transaction. When nothing did, it costs one query.
func (d *DB) Read(ctx context.Context, cursor int64, limit int) (Batch, error) {
	if limit < 1 {
		return Batch{}, fmt.Errorf("storewatch: limit %d: must be positive", limit)
	}
	if err := d.reopenIfReplaced(); err != nil {
		return Batch{}, err
	}
	tx, err := d.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return Batch{}, fmt.Errorf("nix database: %w", err)
	}
	defer tx.Rollback()
	var high int64
	d.queries.Add(1)
	err = tx.QueryRowContext(ctx, "SELECT seq FROM sqlite_sequence WHERE name = 'ValidPaths'").Scan(&high)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return Batch{}, fmt.Errorf("nix database: last id: %w", err)
	}
	b := Batch{Next: cursor}
	if high < cursor {
		b.Reset, cursor = true, 0
		b.Next = 0
	}
	if high == cursor {
		return b, nil
	}
	d.queries.Add(1)
	rows, err := tx.QueryContext(ctx, `SELECT id, path, registrationTime, deriver, ultimate, sigs, ca
		FROM ValidPaths WHERE id > ? AND id <= ? ORDER BY id LIMIT ?`, cursor, high, limit)
	if err != nil {
		return Batch{}, fmt.Errorf("nix database: valid paths: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var p Path
		var reg int64
		var deriver, sigs, ca sql.NullString
		var ultimate sql.NullInt64
		if err := rows.Scan(&p.ID, &p.Path, &reg, &deriver, &ultimate, &sigs, &ca); err != nil {
			return Batch{}, fmt.Errorf("nix database: valid paths: %w", err)
		}
		p.Registered = time.Unix(reg, 0)
		p.Deriver, p.CA = deriver.String, ca.String
		p.Ultimate = ultimate.Valid && ultimate.Int64 != 0
		p.Sigs = strings.Fields(sigs.String)
		b.Paths = append(b.Paths, p)
	}
	if err := rows.Err(); err != nil {
		return Batch{}, fmt.Errorf("nix database: valid paths: %w", err)
	}
	// Rows up to high are committed (the sequence moves in the commit
	// that adds them): past the last one returned, the ones missing were
	// deleted (garbage collected), unless the batch was cut.
	b.Next = high
	if len(b.Paths) == limit {
		b.Next = b.Paths[len(b.Paths)-1].ID
		b.More = b.Next < high
	}
	return b, nil
}
