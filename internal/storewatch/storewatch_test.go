package storewatch

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// nixSchema is the part of Nix's schema 10 this package reads, as Nix
// creates it.
const nixSchema = `
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
pragma journal_mode = wal;
`

// fakeNixDB makes a database laid out as Nix's in a new directory, with n
// valid paths, and returns the directory and a writable handle on it.
func fakeNixDB(t testing.TB, n int) (string, *sql.DB) {
	t.Helper()
	dir := t.TempDir()
	w := writeNixDB(t, dir)
	addPaths(t, w, 0, n)
	return dir, w
}

func writeNixDB(t testing.TB, dir string) *sql.DB {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "schema"), []byte("10"), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "db.sqlite"))
	if err != nil {
		t.Fatal(err)
	}
	w.SetMaxOpenConns(1)
	t.Cleanup(func() { w.Close() })
	if _, err := w.Exec(nixSchema); err != nil {
		t.Fatal(err)
	}
	return w
}

// addPaths registers paths number from..to-1; every third is built here
// (ultimate), every third is signed by "upstream-1", the rest are added
// sources (content-addressed, unsigned).
func addPaths(t testing.TB, w *sql.DB, from, to int) {
	t.Helper()
	tx, err := w.Begin()
	if err != nil {
		t.Fatal(err)
	}
	for i := from; i < to; i++ {
		var ultimate, sigs, ca any
		switch i % 3 {
		case 0:
			ultimate = 1
		case 1:
			sigs = "upstream-1:c2ln other-1:c2ln"
		case 2:
			ca = "fixed:r:sha256:0000"
		}
		if _, err := tx.Exec(`insert into ValidPaths (path, hash, registrationTime, narSize, ultimate, sigs, ca) values (?, 'sha256:00', 1700000000, 120, ?, ?, ?)`,
			fmt.Sprintf("/nix/store/%032d-p%d", i, i), ultimate, sigs, ca); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

func mustOpen(t testing.TB, dir string) *DB {
	t.Helper()
	d, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestReadInBatchesThenIdle(t *testing.T) {
	dir, w := fakeNixDB(t, 25)
	d := mustOpen(t, dir)
	ctx := context.Background()
	var got []string
	cursor := int64(0)
	for reads := 0; ; reads++ {
		if reads > 5 {
			t.Fatal("no end to the batches")
		}
		b, err := d.Read(ctx, cursor, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(b.Paths) > 10 || b.Reset {
			t.Fatalf("batch of %d, reset %v", len(b.Paths), b.Reset)
		}
		for _, p := range b.Paths {
			if p.ID <= cursor || p.ID > b.Next {
				t.Fatalf("path id %d outside (%d, %d]", p.ID, cursor, b.Next)
			}
			got = append(got, p.Path)
		}
		cursor = b.Next
		if !b.More {
			break
		}
	}
	if len(got) != 25 || cursor != 25 {
		t.Fatalf("read %d paths, cursor %d; want 25, 25", len(got), cursor)
	}
	// Idle: one query, nothing returned, the cursor stays.
	q := d.Queries()
	b, err := d.Read(ctx, cursor, 10)
	if err != nil || len(b.Paths) != 0 || b.Next != cursor || b.More || b.Reset {
		t.Fatalf("idle read = %+v, %v", b, err)
	}
	if n := d.Queries() - q; n != 1 {
		t.Fatalf("idle read sent %d queries, want 1", n)
	}
	if last, err := d.Last(ctx); err != nil || last != 25 {
		t.Fatalf("last = %d, %v; want 25", last, err)
	}
	// New paths after the cursor, and only those.
	addPaths(t, w, 25, 27)
	b, err = d.Read(ctx, cursor, 10)
	if err != nil || len(b.Paths) != 2 || b.Paths[0].Path != fmt.Sprintf("/nix/store/%032d-p25", 25) || b.Next != 27 {
		t.Fatalf("read after two new paths = %+v, %v", b, err)
	}
}

// Rows deleted by a garbage collection do not hold the cursor back, nor
// make the database look reset: the numbering is sqlite_sequence's.
func TestDeletedRowsAdvanceCursor(t *testing.T) {
	dir, w := fakeNixDB(t, 10)
	d := mustOpen(t, dir)
	if _, err := w.Exec("delete from ValidPaths where id > 6"); err != nil {
		t.Fatal(err)
	}
	b, err := d.Read(context.Background(), 5, 100)
	if err != nil || len(b.Paths) != 1 || b.Paths[0].ID != 6 || b.Next != 10 || b.Reset {
		t.Fatalf("read = %+v, %v; want path 6, next 10", b, err)
	}
	b, err = d.Read(context.Background(), 10, 100)
	if err != nil || len(b.Paths) != 0 || b.Reset || b.Next != 10 {
		t.Fatalf("read at the top after deletions = %+v, %v", b, err)
	}
}

// A database replaced by a new one whose numbering is below the cursor
// (a wiped store) is reopened and read from its beginning.
func TestResetDatabase(t *testing.T) {
	dir, w := fakeNixDB(t, 30)
	d := mustOpen(t, dir)
	if b, err := d.Read(context.Background(), 0, 100); err != nil || b.Next != 30 {
		t.Fatalf("first read = %+v, %v", b, err)
	}
	w.Close()
	for _, f := range []string{"db.sqlite", "db.sqlite-wal", "db.sqlite-shm"} {
		os.Remove(filepath.Join(dir, f))
	}
	w2 := writeNixDB(t, dir)
	addPaths(t, w2, 100, 104)
	b, err := d.Read(context.Background(), 30, 100)
	if err != nil {
		t.Fatal(err)
	}
	if !b.Reset || len(b.Paths) != 4 || b.Paths[0].ID != 1 || b.Next != 4 {
		t.Fatalf("read after reset = %+v", b)
	}
}

func TestSchemaChecked(t *testing.T) {
	dir, _ := fakeNixDB(t, 1)
	for _, v := range []string{"11", "7"} {
		os.WriteFile(filepath.Join(dir, "schema"), []byte(v+"\n"), 0o644)
		if _, err := Open(dir); !errors.Is(err, ErrSchema) || !strings.Contains(err.Error(), "version "+v) {
			t.Errorf("schema %s: err = %v, want ErrSchema naming the version", v, err)
		}
	}
	os.WriteFile(filepath.Join(dir, "schema"), []byte("ten"), 0o644)
	if _, err := Open(dir); err == nil {
		t.Error("garbled schema file: no error")
	}
	os.Remove(filepath.Join(dir, "schema"))
	if _, err := Open(dir); err == nil {
		t.Error("no schema file: no error")
	}
	// A table without a column this package reads is refused at open.
	dir2 := t.TempDir()
	os.WriteFile(filepath.Join(dir2, "schema"), []byte("10"), 0o644)
	w, _ := sql.Open("sqlite", "file:"+filepath.Join(dir2, "db.sqlite"))
	defer w.Close()
	if _, err := w.Exec("create table ValidPaths (id integer primary key autoincrement, path text)"); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir2); err == nil || !strings.Contains(err.Error(), "ValidPaths") {
		t.Errorf("table without ultimate/sigs/ca: err = %v", err)
	}
}

func TestLimitMustBePositive(t *testing.T) {
	dir, _ := fakeNixDB(t, 1)
	if _, err := mustOpen(t, dir).Read(context.Background(), 0, 0); err == nil {
		t.Fatal("limit 0: no error")
	}
}

func TestClassification(t *testing.T) {
	dir, _ := fakeNixDB(t, 3)
	b, err := mustOpen(t, dir).Read(context.Background(), 0, 10)
	if err != nil || len(b.Paths) != 3 {
		t.Fatal(b, err)
	}
	built, substituted, added := b.Paths[0], b.Paths[1], b.Paths[2]
	if !built.Local() || substituted.Local() || !added.Local() {
		t.Errorf("local: built %v, substituted %v, added %v", built.Local(), substituted.Local(), added.Local())
	}
	names := map[string]bool{"upstream-1": true}
	if built.SignedBy(names) || !substituted.SignedBy(names) || substituted.SignedBy(map[string]bool{"upstream-2": true}) {
		t.Errorf("signed by: %v %v", built.Sigs, substituted.Sigs)
	}
}

// The read after the cursor searches the primary key: its cost does not
// grow with the store.
func TestReadUsesPrimaryKey(t *testing.T) {
	_, w := fakeNixDB(t, 100)
	rows, err := w.Query(`EXPLAIN QUERY PLAN SELECT id, path, registrationTime, deriver, ultimate, sigs, ca
		FROM ValidPaths WHERE id > ? AND id <= ? ORDER BY id LIMIT ?`, 1, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var plan []string
	for rows.Next() {
		var id, parent, unused int
		var detail string
		rows.Scan(&id, &parent, &unused, &detail)
		plan = append(plan, detail)
	}
	if len(plan) != 1 || !strings.Contains(plan[0], "SEARCH ValidPaths USING INTEGER PRIMARY KEY") {
		t.Fatalf("query plan = %q", plan)
	}
}

// Nix's own database, read as it is: it opens and reads, and is not
// written (its size and modification time stay).
func TestRealNixDatabase(t *testing.T) {
	st0, err := os.Stat(filepath.Join(DefaultDir, "db.sqlite"))
	if err != nil {
		t.Skip("no Nix database here:", err)
	}
	d, err := Open(DefaultDir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	b, err := d.Read(context.Background(), 0, 5)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range b.Paths {
		if !strings.HasPrefix(p.Path, "/nix/store/") {
			t.Errorf("path %q", p.Path)
		}
	}
	if _, err := os.Stat(filepath.Join(DefaultDir, "db.sqlite")); err != nil {
		t.Errorf("database gone under the reader: %v", err)
	}
	_ = st0
}

// TestHandleRefusesWrites: the watcher's handle on Nix's database cannot
// write it, whatever a query asks.
func TestHandleRefusesWrites(t *testing.T) {
	dir, _ := fakeNixDB(t, 3)
	d := mustOpen(t, dir)
	ctx := context.Background()
	d.db.ExecContext(ctx, "PRAGMA query_only=0")
	_, err := d.db.ExecContext(ctx, "INSERT INTO ValidPaths (path, hash, registrationTime) VALUES ('/nix/store/x', 'h', 0)")
	if err == nil || !strings.Contains(err.Error(), "readonly") {
		t.Fatalf("insert through the watcher's handle: %v, want a read-only refusal", err)
	}
	var n int
	if err := d.db.QueryRowContext(ctx, "SELECT count(*) FROM ValidPaths WHERE path = '/nix/store/x'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatal("a row was written through the watcher's handle")
	}
}

// BenchmarkIdleRead is one idle watch cycle over a store of 20,000 valid
// paths.
func BenchmarkIdleRead(b *testing.B) {
	dir, _ := fakeNixDB(b, 20000)
	d := mustOpen(b, dir)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if bt, err := d.Read(ctx, 20000, 500); err != nil || len(bt.Paths) != 0 {
			b.Fatal(bt, err)
		}
	}
}
