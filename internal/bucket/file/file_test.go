package file

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/bucket/buckettest"
)

func TestContract(t *testing.T) {
	b, err := New(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	buckettest.Run(t, b)
}

func TestRejectsEscapingKeys(t *testing.T) {
	b, _ := New(t.TempDir())
	for _, k := range []string{"../x", "/etc/passwd", "a/../../x", ""} {
		if _, err := b.path(k); err == nil {
			t.Errorf("key %q accepted", k)
		}
	}
}

func TestRemovesTempsAtStart(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "nar"), 0o755)
	tmp := filepath.Join(dir, "nar", ".tmp-123")
	os.WriteFile(tmp, []byte("partial"), 0o644)
	old := time.Now().Add(-2 * time.Hour)
	os.Chtimes(tmp, old, old)
	young := filepath.Join(dir, "nar", ".tmp-456") // another process's write in progress
	os.WriteFile(young, []byte("partial"), 0o644)
	if _, err := New(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatal("orphaned temp file survived New")
	}
	if _, err := os.Stat(young); err != nil {
		t.Fatal("a young temp file (another writer's) was removed")
	}
}
