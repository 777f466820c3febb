package gcroots

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRoots(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "roots")
	r, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	a, b := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"
	for i := 0; i < 2; i++ { // idempotent
		if err := r.Add(a); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := os.Readlink(filepath.Join(dir, filepath.Base(a))); got != a {
		t.Fatalf("root points at %q", got)
	}
	added, removed, err := r.Reconcile([]string{b})
	if err != nil || added != 1 || removed != 1 {
		t.Fatalf("Reconcile = %d, %d, %v", added, removed, err)
	}
	if err := r.Remove(b); err != nil {
		t.Fatal(err)
	}
	if err := r.Remove(b); err != nil {
		t.Fatal("second Remove failed")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left %v", ents)
	}
	off, _ := New("")
	if off.Enabled() || off.Add(a) != nil {
		t.Fatal("disabled roots did something")
	}
}
