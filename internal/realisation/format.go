package realisation

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"slices"
	"sort"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/nixsig"
)

// ContentType is what Nix sets on realisation objects.
const ContentType = "application/json"

// Key is the object key of a realisation in the Nix 2.4 … 2.34 layout
// (cachefmt.Layout.Realisation).
func Key(id string) string { return cachefmt.Keys.Realisation(id) }

// BuildTraceKey is the object key of a build trace entry in the Nix 2.35
// layout (cachefmt.Layout.BuildTrace).
func BuildTraceKey(drvBase, output string) string { return cachefmt.Keys.BuildTrace(drvBase, output) }

// Fingerprint is what a realisation's signatures sign: its JSON without
// the signatures.
func Fingerprint(r *nixstore.Realisation) []byte { return render(r, false) }

// Document is the realisation object as Nix writes it.
func Document(r *nixstore.Realisation) []byte { return render(r, true) }

func render(r *nixstore.Realisation, withSigs bool) []byte {
	var b bytes.Buffer
	b.WriteString(`{"dependentRealisations":{`)
	deps := make([]string, 0, len(r.DependentRealisations))
	for id := range r.DependentRealisations {
		deps = append(deps, id)
	}
	sort.Strings(deps)
	for i, id := range deps {
		if i > 0 {
			b.WriteByte(',')
		}
		jsonString(&b, id)
		b.WriteByte(':')
		jsonString(&b, r.DependentRealisations[id])
	}
	b.WriteString(`},"id":`)
	jsonString(&b, r.ID)
	b.WriteString(`,"outPath":`)
	jsonString(&b, r.OutPath)
	if withSigs {
		sigs := slices.Clone(r.Signatures)
		nixsig.SortStrings(sigs)
		b.WriteString(`,"signatures":[`)
		for i, s := range sigs {
			if i > 0 {
				b.WriteByte(',')
			}
			jsonString(&b, s)
		}
		b.WriteByte(']')
	}
	b.WriteByte('}')
	return b.Bytes()
}

// Sign replaces r's signatures by ours over its fingerprint, keeping the
// ones it has from other keys (nixsig's rule: they sign this very
// document), in Nix's order.
func Sign(r *nixstore.Realisation, keys []signature.SecretKey) error {
	sigs, err := nixsig.Merge(string(Fingerprint(r)), keys, r.Signatures)
	if err != nil {
		return fmt.Errorf("realisation %s: %w", r.ID, err)
	}
	r.Signatures = nixsig.Strings(sigs)
	return nil
}

// BuildTraceFingerprint is what a build trace entry's signatures sign.
func BuildTraceFingerprint(drvBase, output, outPath string) []byte {
	var b bytes.Buffer
	b.WriteString(`{"key":{"drvPath":`)
	jsonString(&b, drvBase)
	b.WriteString(`,"outputName":`)
	jsonString(&b, output)
	b.WriteString(`},"value":{"outPath":`)
	jsonString(&b, outPath)
	b.WriteString(`}}`)
	return b.Bytes()
}

// BuildTraceDocument is a build trace entry signed with keys, keeping the
// signatures stored from other keys (nixsig's rule). stored must sign this
// entry's own fingerprint: signatures a Nix 2.35 store holds for the same
// build trace entry, never those of a Nix ≤ 2.34 realisation, which sign
// another text and would not verify here.
func BuildTraceDocument(drvBase, output, outPath string, keys []signature.SecretKey, stored []string) ([]byte, error) {
	sigs, err := nixsig.Merge(string(BuildTraceFingerprint(drvBase, output, outPath)), keys, stored)
	if err != nil {
		return nil, fmt.Errorf("build trace entry %s^%s: %w", drvBase, output, err)
	}
	var b bytes.Buffer
	b.WriteString(`{"outPath":`)
	jsonString(&b, outPath)
	b.WriteString(`,"signatures":[`)
	for i, s := range sigs {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"keyName":`)
		jsonString(&b, s.Name)
		b.WriteString(`,"sig":`)
		jsonString(&b, base64.StdEncoding.EncodeToString(s.Data))
		b.WriteByte('}')
	}
	b.WriteString(`]}`)
	return b.Bytes(), nil
}

// jsonString writes s as nlohmann::json::dump does: quotes, backslashes
// and control characters escaped, everything else (UTF-8 included) as is.
func jsonString(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			if c < 0x20 {
				fmt.Fprintf(b, `\u%04x`, c)
			} else {
				b.WriteByte(c)
			}
		}
	}
	b.WriteByte('"')
}
