package uploader

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

// KeyFiles joins the key files given on the command line with those the
// cache URL names (secret-key=, secret-keys=), in that order, each once.
func KeyFiles(flags, fromURL []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, f := range append(append([]string(nil), flags...), fromURL...) {
		if c := filepath.Clean(f); !seen[c] {
			seen[c] = true
			out = append(out, f)
		}
	}
	return out
}

// LoadSecretKeys reads Nix secret key files (as written by `nix key
// generate-secret` or `nix-store --generate-binary-cache-key`). A key file
// that group or others can read is refused unless allowInsecure is set. The
// error never contains key material.
func LoadSecretKeys(files []string, allowInsecure bool) ([]signature.SecretKey, error) {
	var keys []signature.SecretKey
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			return nil, fmt.Errorf("secret key file: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 && !allowInsecure {
			return nil, fmt.Errorf("secret key file %s is readable by group or others (mode %04o); chmod 600 it or pass --allow-insecure-key-perms", f, fi.Mode().Perm())
		}
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("secret key file: %w", err)
		}
		// Nix's base64 decoder skips newlines; Go's does not.
		k, err := signature.LoadSecretKey(strings.TrimSpace(string(data)))
		if err != nil {
			return nil, fmt.Errorf("secret key file %s: not a Nix secret key (want NAME:BASE64, as `nix key generate-secret` writes)", f)
		}
		keys = append(keys, k)
	}
	return keys, nil
}
