package realisation

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/internal/nixstore"
)

// The secret key of Nix's realisation tests (src/libstore-tests/realisation.cc).
const nixTestKey = "test-key:tU7tTvLcScf8pmz/eTV0BEtLmRsPpZfKaRcd0nCN+pysBZPHSeg61/u2oc7mIOewfuAY1V1BiX32homTaDJ2Jw=="

// nixFixture reads one of Nix 2.35.2's unit-test files, JSON compacted
// the way nlohmann's dump() writes it (keys are already sorted there).
func nixFixture(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "nix-2.35.2", name))
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasSuffix(name, ".json") {
		var b bytes.Buffer
		if err := json.Compact(&b, data); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	return string(data)
}

// TestBuildTraceMatchesNixFixtures: fingerprints, signatures and the
// documents of the build-trace-v2 layout are byte for byte those of Nix's
// own tests, including a signature from another key kept in Nix's order.
func TestBuildTraceMatchesNixFixtures(t *testing.T) {
	key, err := signature.LoadSecretKey(nixTestKey)
	if err != nil {
		t.Fatal(err)
	}
	const drv, out = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", "foo"
	asdf := "asdf:" + base64.StdEncoding.EncodeToString(make([]byte, 64))
	for _, c := range []struct {
		name, outPath string
		stored        []string
		unkeyed       string // the document without our signature
	}{
		{"simple", "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo", nil, "unkeyed-simple.json"},
		{"with-signature", "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv", []string{asdf}, "unkeyed-with-signature.json"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got, want := string(BuildTraceFingerprint(drv, out, c.outPath)), nixFixture(t, c.name+"-fingerprint.txt"); got != want {
				t.Fatalf("fingerprint\n%s\nNix:\n%s", got, want)
			}
			// Without our keys: exactly Nix's unkeyed document.
			doc, err := BuildTraceDocument(drv, out, c.outPath, nil, c.stored)
			if err != nil {
				t.Fatal(err)
			}
			if want := nixFixture(t, c.unkeyed); string(doc) != want {
				t.Fatalf("document\n%s\nNix:\n%s", doc, want)
			}
			// With Nix's test key: the signature is Nix's (ed25519 is
			// deterministic) and goes after "asdf".
			doc, err = BuildTraceDocument(drv, out, c.outPath, []signature.SecretKey{key}, c.stored)
			if err != nil {
				t.Fatal(err)
			}
			want := strings.TrimSuffix(nixFixture(t, c.unkeyed), "]}")
			if len(c.stored) > 0 {
				want += ","
			}
			want += nixFixture(t, c.name+"-sig.json") + "]}"
			if string(doc) != want {
				t.Fatalf("signed document\n%s\nwant\n%s", doc, want)
			}
		})
	}
}

// TestLegacySignatureOrder: the legacy document lists its signatures in
// Nix's (key name, bytes) order too, not by their strings.
func TestLegacySignatureOrder(t *testing.T) {
	r, err := nixstore.ParseRealisation([]byte(nixDocD))
	if err != nil {
		t.Fatal(err)
	}
	ab := "a-b:" + base64.StdEncoding.EncodeToString(make([]byte, 64))
	aFF := "a:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xff}, 64))
	a00 := "a:" + base64.StdEncoding.EncodeToString(make([]byte, 64))
	r.Signatures = []string{ab, aFF, a00}
	want := strings.Replace(nixDocD, `"signatures":[]`, `"signatures":["`+a00+`","`+aFF+`","`+ab+`"]`, 1)
	if got := string(Document(r)); got != want {
		t.Fatalf("Document\n%s\nwant\n%s", got, want)
	}
	if err := Sign(r, nil); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(r.Signatures, " "); got != a00+" "+aFF+" "+ab {
		t.Fatalf("Sign kept %s", got)
	}
}
