package main

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/internal/testenv"
)

// The imported closure is what the rows assume: valid paths with the
// declared references and contents, whose NAR hashes Nix agrees with.
func TestImportClosure(t *testing.T) {
	testenv.RequireNix(t)
	env := testenv.NixEnv("")
	c, err := importClosure(env, "bench-test-"+testenv.Unique(), 3, 1000, true)
	if err != nil {
		t.Fatal(err)
	}
	defer deletePaths(env, c.All())
	refs := strings.Fields(testenv.Run(t, env, "nix-store", "-q", "--references", c.Top))
	slices.Sort(refs)
	want := slices.Clone(c.Deps)
	slices.Sort(want)
	if !slices.Equal(refs, want) {
		t.Fatalf("references of the top path: %v, want %v", refs, want)
	}
	testenv.Run(t, env, "nix-store", append([]string{"--verify-path"}, c.All()...)...)
	var total int64
	for _, p := range c.All() {
		n, err := strconv.ParseInt(strings.TrimSpace(testenv.Run(t, env, "nix-store", "-q", "--size", p)), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	if total != c.Bytes {
		t.Fatalf("closure NAR bytes: store says %d, importClosure %d", total, c.Bytes)
	}
	if data, err := os.ReadFile(c.Deps[0]); err != nil || len(data) != 1000 {
		t.Fatalf("dependency contents: %d bytes, %v", len(data), err)
	}
	deletePaths(env, c.All())
	if _, err := os.Stat(c.Top); !os.IsNotExist(err) {
		t.Fatalf("top path still there after deletePaths: %v", err)
	}
}
