// Package nixsig orders and merges the signatures nixspool writes into
// narinfos and realisations, the way current Nix does.
//
// Nix 2.34 and later hold a path's or a realisation's signatures as a set
// of (key name, raw signature bytes) pairs (libutil's signature/local-keys.hh:
// the struct's defaulted comparison, key name first, then the bytes as
// unsigned chars) and write them in that order: one "Sig:" line each in a
// narinfo, one array element each in a realisation. Nix ≤ 2.33 ordered
// the "name:base64" strings instead; the two orders differ when one key name
// is a prefix of another ("a" against "a-b": '-' sorts before ':') and for
// most pairs of signatures under one name (base64's alphabet is not in byte
// order). Readers accept any order; writing Nix's own makes nixspool's
// objects byte for byte what Nix would have written.
//
// One rule decides which signatures a document carries: a fresh signature
// by each of our keys over the document's fingerprint, plus every
// signature the local store holds over that same fingerprint from a key of
// another name. A stored signature that does not parse is dropped (Nix ≥
// 2.34 refuses the whole narinfo or realisation over it), and so is a
// stored one under one of our names (ours are made afresh).
package nixsig

import (
	"bytes"
	"fmt"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

// Compare orders a and b as Nix does: by key name, then by the raw
// signature bytes.
func Compare(a, b signature.Signature) int {
	if c := strings.Compare(a.Name, b.Name); c != 0 {
		return c
	}
	return bytes.Compare(a.Data, b.Data)
}

// Sort sorts sigs in Nix's order and removes duplicates, as inserting them
// into Nix's set does. It returns the shortened slice.
func Sort(sigs []signature.Signature) []signature.Signature {
	slices.SortFunc(sigs, Compare)
	return slices.CompactFunc(sigs, func(a, b signature.Signature) bool { return Compare(a, b) == 0 })
}

// Merge returns the signatures of a document whose fingerprint is fp: ours
// (one per key, made now) and the stored ones from keys of other names,
// which must sign fp too (the caller passes only signatures the store holds
// for this very document). Sorted in Nix's order.
func Merge(fp string, keys []signature.SecretKey, stored []string) ([]signature.Signature, error) {
	out := make([]signature.Signature, 0, len(keys)+len(stored))
	ours := make(map[string]bool, len(keys))
	for _, k := range keys {
		sig, err := k.Sign(nil, fp)
		if err != nil {
			return nil, fmt.Errorf("sign: %w", err)
		}
		out = append(out, sig)
		ours[sig.Name] = true
	}
	for _, s := range stored {
		sig, err := signature.ParseSignature(s)
		if err != nil || ours[sig.Name] {
			continue
		}
		out = append(out, sig)
	}
	return Sort(out), nil
}

// Strings renders sigs as "name:base64" strings, in their order.
func Strings(sigs []signature.Signature) []string {
	out := make([]string, len(sigs))
	for i, s := range sigs {
		out[i] = s.String()
	}
	return out
}

// SortStrings sorts "name:base64" signatures in Nix's order. A string that
// does not parse as a signature sorts by its text after all the others.
func SortStrings(sigs []string) {
	slices.SortStableFunc(sigs, func(a, b string) int {
		sa, errA := signature.ParseSignature(a)
		sb, errB := signature.ParseSignature(b)
		switch {
		case errA == nil && errB == nil:
			return Compare(sa, sb)
		case errA == nil:
			return -1
		case errB == nil:
			return 1
		}
		return strings.Compare(a, b)
	})
}
