package spool

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func TestWriteReadRemove(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	want := Entry{Paths: []string{"/nix/store/a", "/nix/store/b"}, Drv: "/nix/store/x.drv"}
	p1, err := Write(dir, want)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := Write(dir, Entry{Paths: []string{"/nix/store/c"}})
	if err != nil {
		t.Fatal(err)
	}
	// A leftover temp file of a crashed writer is not listed.
	os.WriteFile(filepath.Join(dir, ".123.json.tmp"), []byte("{"), 0o600)
	files, err := Files(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(files, []string{p1, p2}) {
		t.Fatalf("Files = %v, want [%s %s]", files, p1, p2)
	}
	got, err := Read(p1)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("Read = %+v, %v", got, err)
	}
	if err := Remove(p1); err != nil {
		t.Fatal(err)
	}
	if files, _ := Files(dir); len(files) != 1 {
		t.Fatalf("after remove: %v", files)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("spool dir mode %v, want 0700", fi.Mode().Perm())
	}
}

func TestReadRejectsGarbage(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.json")
	os.WriteFile(p, []byte("not json"), 0o600)
	if _, err := Read(p); err == nil {
		t.Fatal("Read accepted garbage")
	}
	if files, _ := Files(filepath.Join(t.TempDir(), "missing")); files != nil {
		t.Fatal("missing dir should list nothing")
	}
}

func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	old := filepath.Join(dir, ".tmp-123")
	fresh := filepath.Join(dir, ".tmp-456")
	os.WriteFile(old, nil, 0o600)
	os.WriteFile(fresh, nil, 0o600)
	past := time.Now().Add(-2 * time.Hour)
	os.Chtimes(old, past, past)
	RemoveStaleTemps(dir, time.Hour)
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Error("stale temp file kept")
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Error("fresh temp file removed")
	}
}

// TestScan: requests waiting, requests set aside and entries no writer
// makes are told apart; temp files of writers are left out.
func TestScan(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	f1, _ := Write(dir, Entry{Paths: []string{"/nix/store/a"}})
	f2, _ := Write(dir, Entry{Paths: []string{"/nix/store/b"}})
	if err := Quarantine(f2); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, ".tmp-1"), nil, 0o600)
	os.WriteFile(filepath.Join(dir, "other.txt"), nil, 0o600)
	os.Symlink(f1, filepath.Join(dir, "9-link.json"))
	os.Mkdir(filepath.Join(dir, "9-dir.json"), 0o700)
	l, err := Scan(dir)
	if err != nil {
		t.Fatal(err)
	}
	odd := []string{filepath.Join(dir, "9-dir.json"), filepath.Join(dir, "9-link.json"), filepath.Join(dir, "other.txt")}
	if !reflect.DeepEqual(l.Files, []string{f1}) || !reflect.DeepEqual(l.Bad, []string{f2 + ".bad"}) || !reflect.DeepEqual(l.Odd, odd) {
		t.Fatalf("Scan = %+v", l)
	}
}
