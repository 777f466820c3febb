package nixsig

import (
	"bytes"
	"crypto/rand"
	"slices"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

func sig(name string, b byte) signature.Signature {
	return signature.Signature{Name: name, Data: bytes.Repeat([]byte{b}, 64)}
}

// TestOrderIsNixs: key name first, then the raw bytes, where the
// "name:base64" string order says otherwise.
func TestOrderIsNixs(t *testing.T) {
	in := []signature.Signature{sig("a-b", 0), sig("a", 0xff), sig("a", 0), sig("a", 0xff)}
	// As strings: "a-b:AAAA…" < "a:////…" < "a:AAAA…" ('-' < ':' and '/' < 'A').
	strs := Strings(in)
	slices.Sort(strs)
	if !strings.HasPrefix(strs[0], "a-b:") || !strings.HasPrefix(strs[1], "a:/") {
		t.Fatalf("string order %v: the test no longer tells the orders apart", strs)
	}
	got := Sort(slices.Clone(in))
	want := []signature.Signature{sig("a", 0), sig("a", 0xff), sig("a-b", 0)}
	if !slices.EqualFunc(got, want, func(a, b signature.Signature) bool { return Compare(a, b) == 0 }) {
		t.Fatalf("Sort = %v, want %v (the duplicate removed)", Strings(got), Strings(want))
	}
	s := Strings(in)
	SortStrings(s)
	if s[0] != sig("a", 0).String() || s[1] != sig("a", 0xff).String() || s[3] != sig("a-b", 0).String() {
		t.Fatalf("SortStrings = %v", s)
	}
}

// TestNixFixtureOrder: the signatures of Nix 2.35.2's narinfo fixture
// (src/libstore-tests/data/nar-info/json-3/impure.json: "asdf", then
// "qwer", 64 zero bytes each) come out in the fixture's order whichever
// order they go in.
func TestNixFixtureOrder(t *testing.T) {
	got := Strings(Sort([]signature.Signature{sig("qwer", 0), sig("asdf", 0)}))
	zeros := strings.Repeat("A", 86) + "=="
	if want := []string{"asdf:" + zeros, "qwer:" + zeros}; !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestMerge(t *testing.T) {
	ours, pub, _ := signature.GenerateKeypair("ours-1", rand.Reader)
	other, _, _ := signature.GenerateKeypair("ours", rand.Reader) // a prefix of ours-1: sorts first
	fp := "1;/nix/store/x;sha256:y;1;"
	theirs, _ := other.Sign(nil, fp)
	stale, _ := ours.Sign(nil, "another text")
	stored := []string{stale.String(), "corrupt:not base64!", theirs.String(), theirs.String(), "nocolon"}
	got, err := Merge(fp, []signature.SecretKey{ours}, stored)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Name != "ours" || got[1].Name != "ours-1" {
		t.Fatalf("Merge = %v, want other's kept once, ours made afresh, corrupt ones dropped, Nix's order", Strings(got))
	}
	if !pub.Verify(fp, got[1]) {
		t.Fatal("our signature does not sign the fingerprint")
	}
}
