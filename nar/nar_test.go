package nar

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nar/ls"
	"github.com/nixspool/nixspool/internal/testenv"
)

// makeTree builds a tree with every kind of entry, including names that
// go-nix's writer rejects ("..data", "...").
func makeTree(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "tree")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "sub", "deeper"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "empty-dir"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "..2024_01_01"), 0o755))
	must(os.WriteFile(filepath.Join(root, "empty"), nil, 0o644))
	must(os.WriteFile(filepath.Join(root, "run.sh"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(root, "sub", "a"), []byte("a\n"), 0o644))
	must(os.WriteFile(filepath.Join(root, "sub", "deeper", "eight888"), []byte("12345678"), 0o644))
	must(os.WriteFile(filepath.Join(root, "..2024_01_01", "cfg"), []byte("x=1"), 0o644))
	must(os.WriteFile(filepath.Join(root, "..."), []byte("dots"), 0o644))
	must(os.Symlink("../run.sh", filepath.Join(root, "sub", "l")))
	must(os.Symlink("..2024_01_01", filepath.Join(root, "..data")))
	must(os.WriteFile(filepath.Join(root, "B-upper"), bytes.Repeat([]byte{0}, 100000), 0o600))
	return root
}

func TestDumpMatchesNixStoreDump(t *testing.T) {
	nixStore, err := exec.LookPath("nix-store")
	if err != nil {
		// TestDumpParsesWithGoNix still checks the format without Nix.
		testenv.Missing(t, "nix-store (Debian's nix-bin)")
	}
	root := makeTree(t)
	for _, p := range []string{root, filepath.Join(root, "run.sh"), filepath.Join(root, "sub", "l"), filepath.Join(root, "empty-dir")} {
		want, err := exec.Command(nixStore, "--dump", p).Output()
		if err != nil {
			t.Fatalf("nix-store --dump %s: %v", p, err)
		}
		var got bytes.Buffer
		n, _, err := Dump(&got, p, false)
		if err != nil {
			t.Fatal(err)
		}
		if n != int64(got.Len()) || !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("%s: NAR differs from nix-store --dump (%d vs %d bytes)", p, got.Len(), len(want))
		}
	}
}

func TestDumpParsesWithGoNix(t *testing.T) {
	root := makeTree(t)
	var buf bytes.Buffer
	if _, _, err := Dump(&buf, root, false); err != nil {
		t.Fatal(err)
	}
	r, err := gonar.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for {
		h, err := r.Next()
		if err != nil {
			break
		}
		paths = append(paths, h.Path)
	}
	if len(paths) < 10 {
		t.Fatalf("go-nix read only %v", paths)
	}
}

func TestListing(t *testing.T) {
	root := makeTree(t)
	var buf bytes.Buffer
	_, listing, err := Dump(&buf, root, true)
	if err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(listing)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := ls.ParseLS(bytes.NewReader(js))
	if err != nil {
		t.Fatalf("go-nix cannot parse our listing: %v\n%s", err, js)
	}
	run := parsed.Root.Entries["run.sh"]
	if run == nil || !run.Executable || run.Size != 18 {
		t.Fatalf("run.sh entry = %+v", run)
	}
	// narOffset points at the contents in the NAR.
	if got := buf.Bytes()[run.NAROffset : run.NAROffset+run.Size]; string(got) != "#!/bin/sh\necho hi\n" {
		t.Fatalf("narOffset of run.sh points at %q", got)
	}
	if parsed.Root.Entries["empty-dir"].Type != "directory" {
		t.Fatal("empty-dir missing from the listing")
	}
	if parsed.Root.Entries["..data"].LinkTarget != "..2024_01_01" {
		t.Fatal("..data symlink missing from the listing")
	}
}
