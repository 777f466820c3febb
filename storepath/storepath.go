// Package storepath checks that a string names a top-level path in a Nix
// store, using the same rules Nix applies to store path names. It is the gate
// that keeps anything but store paths (e.g. /etc/shadow, or a path smuggled in
// through "..") away from the uploader.
package storepath

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// DefaultStoreDir is the store directory of a standard Nix installation.
const DefaultStoreDir = "/nix/store"

const (
	hashLen    = 32  // nix32 encoding of the 160-bit path hash
	maxNameLen = 211 // Nix's limit on the name part of a store path
	nix32Chars = "0123456789abcdfghijklmnpqrsvwxyz"
)

// ErrNotStorePath is wrapped by every error Check returns.
var ErrNotStorePath = errors.New("not a store path")

// Check returns nil if p is an absolute path directly inside storeDir whose
// base name is "<32 nix32 chars>-<name>" with a name Nix accepts. It does
// not touch the file system.
func Check(storeDir, p string) error {
	fail := func(why string) error {
		return fmt.Errorf("%q: %w: %s", p, ErrNotStorePath, why)
	}
	switch {
	case p == "":
		return fail("empty")
	case !filepath.IsAbs(p):
		return fail("not absolute")
	case strings.ContainsRune(p, 0):
		return fail("contains NUL")
	case filepath.Clean(p) != p:
		return fail("not in canonical form (no '..', '.', '//' or trailing '/')")
	case filepath.Dir(p) != storeDir:
		return fail("not directly inside " + storeDir)
	}
	return CheckBase(filepath.Base(p))
}

// CheckBase checks a store path's base name ("<hash>-<name>").
func CheckBase(base string) error {
	fail := func(why string) error {
		return fmt.Errorf("%q: %w: %s", base, ErrNotStorePath, why)
	}
	if len(base) < hashLen+2 || base[hashLen] != '-' {
		return fail("base name is not <hash>-<name>")
	}
	for i := 0; i < hashLen; i++ {
		if !strings.ContainsRune(nix32Chars, rune(base[i])) {
			return fail("hash part is not nix32")
		}
	}
	name := base[hashLen+1:]
	if len(name) > maxNameLen {
		return fail("name longer than 211 characters")
	}
	if name[0] == '.' {
		return fail("name starts with a period")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("+-._?=", c)) {
			return fail(fmt.Sprintf("name contains %q", c))
		}
	}
	return nil
}

// HashPart returns the 32-character hash part of a store path (absolute or
// base name). The path must have passed Check or CheckBase; for anything
// shorter it returns the whole base name rather than panic.
func HashPart(p string) string {
	base := filepath.Base(p)
	return base[:min(len(base), hashLen)]
}

// Name returns the name part of a store path (absolute or base name): what
// follows "<hash>-". For anything shorter than a store path it returns "".
func Name(p string) string {
	base := filepath.Base(p)
	if len(base) <= hashLen+1 {
		return ""
	}
	return base[hashLen+1:]
}
