package atomicfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := Write(p, strings.NewReader("hello"), 5, 0o640); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(p); string(data) != "hello" {
		t.Fatalf("content %q", data)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v", fi.Mode().Perm())
	}
	// A short reader writes nothing and leaves no temp file.
	if err := Write(filepath.Join(dir, "g"), strings.NewReader("hi"), 5, 0o600); err == nil {
		t.Fatal("short write succeeded")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("directory holds %v", ents)
	}
}
