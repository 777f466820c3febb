package uploader

import (
	"slices"
	"testing"
)

func TestKeyFilesJoinsFlagsAndURL(t *testing.T) {
	got := KeyFiles([]string{"/etc/nixspool/a.key", "/etc/nix/b.key"}, []string{"/etc/nix/b.key", "/etc/nix//c.key", "/etc/nix/c.key"})
	if want := []string{"/etc/nixspool/a.key", "/etc/nix/b.key", "/etc/nix//c.key"}; !slices.Equal(got, want) {
		t.Fatalf("KeyFiles = %v, want %v", got, want)
	}
	if got := KeyFiles(nil, nil); len(got) != 0 {
		t.Fatalf("KeyFiles(nil, nil) = %v", got)
	}
}
