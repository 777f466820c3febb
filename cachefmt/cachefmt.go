// Package cachefmt reads the objects of a Nix binary cache as stock Nix does:
// narinfos (tolerantly: unknown keys are ignored, as Nix ignores them, unlike
// go-nix's strict parser), the key layout, and the compression methods of
// NAR files with their magic numbers. The auditor and the collector read
// caches other tools wrote too, so nothing here assumes nixspool wrote them.
package cachefmt

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
)

// NarInfo is a parsed narinfo: the fields Nix reads, as written.
type NarInfo struct {
	StorePath   string
	URL         string
	Compression string // as written; "" means bzip2 to Nix
	FileHash    string
	FileSize    int64 // -1 if absent
	NarHash     string
	NarSize     int64
	References  []string // base names
	Deriver     string
	Sigs        []string
	CA          string
}

// HashPart is the 32-character hash of the narinfo's store path.
func (n *NarInfo) HashPart() string {
	base := n.StorePath[strings.LastIndexByte(n.StorePath, '/')+1:]
	if len(base) < 32 {
		return ""
	}
	return base[:32]
}

// EffectiveCompression is the compression Nix assumes: bzip2 when the field
// is absent or empty.
func (n *NarInfo) EffectiveCompression() string {
	if n.Compression == "" {
		return "bzip2"
	}
	return n.Compression
}

// ParseNarInfo parses a narinfo as Nix does: "Key: value" lines, unknown
// keys ignored, StorePath, URL, NarHash and a non-zero NarSize required.
func ParseNarInfo(data []byte) (*NarInfo, error) {
	n := &NarInfo{FileSize: -1}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	sc.Split(scanLF)
	seenRefs := false
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		key, val, ok := strings.Cut(line, ": ")
		if !ok {
			if k, found := strings.CutSuffix(line, ":"); found {
				key, val, ok = k, "", true
			}
		}
		if !ok {
			return nil, fmt.Errorf("narinfo: malformed line %q", truncate(line))
		}
		var err error
		switch key {
		case "StorePath":
			n.StorePath = val
		case "URL":
			n.URL = val
		case "Compression":
			n.Compression = val
		case "FileHash":
			n.FileHash = val
		case "FileSize":
			n.FileSize, err = strconv.ParseInt(val, 10, 64)
		case "NarHash":
			n.NarHash = val
		case "NarSize":
			n.NarSize, err = strconv.ParseInt(val, 10, 64)
		case "References":
			if seenRefs {
				return nil, errors.New("narinfo: References given twice")
			}
			seenRefs = true
			n.References = strings.Fields(val)
		case "Deriver":
			if val != "unknown-deriver" {
				n.Deriver = val
			}
		case "Sig":
			n.Sigs = append(n.Sigs, val)
		case "CA":
			n.CA = val
		}
		if err != nil {
			return nil, fmt.Errorf("narinfo: %s: %w", key, err)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("narinfo: %w", err)
	}
	switch {
	case n.StorePath == "":
		return nil, errors.New("narinfo: no StorePath")
	case n.URL == "":
		return nil, errors.New("narinfo: no URL")
	case n.NarHash == "":
		return nil, errors.New("narinfo: no NarHash")
	case n.NarSize <= 0:
		return nil, errors.New("narinfo: NarSize missing or zero")
	}
	return n, nil
}

// scanLF splits lines at '\n' only, as Nix does: a carriage return stays
// in the value (bufio.ScanLines would drop one, and read a CRLF narinfo
// that Nix reads with a "\r" at the end of every value, URL included, as a
// good one).
func scanLF(data []byte, atEOF bool) (advance int, token []byte, err error) {
	if i := bytes.IndexByte(data, '\n'); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// Format renders n as Nix writes a narinfo: the fields in Nix's order,
// FileSize only when known, References always, Deriver and CA when set,
// one Sig line per signature. ParseNarInfo reads it back as n.
func (n *NarInfo) Format() []byte {
	var b bytes.Buffer
	line := func(k, v string) { b.WriteString(k + ": " + v + "\n") }
	line("StorePath", n.StorePath)
	line("URL", n.URL)
	if n.Compression != "" {
		line("Compression", n.Compression)
	}
	if n.FileHash != "" {
		line("FileHash", n.FileHash)
	}
	if n.FileSize >= 0 {
		line("FileSize", strconv.FormatInt(n.FileSize, 10))
	}
	line("NarHash", n.NarHash)
	line("NarSize", strconv.FormatInt(n.NarSize, 10))
	line("References", strings.Join(n.References, " "))
	if n.Deriver != "" {
		line("Deriver", n.Deriver)
	}
	for _, s := range n.Sigs {
		line("Sig", s)
	}
	if n.CA != "" {
		line("CA", n.CA)
	}
	return b.Bytes()
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// IsHashPart reports whether s is a 32-character nix32 hash.
func IsHashPart(s string) bool {
	if len(s) != 32 {
		return false
	}
	_, err := nixbase32.DecodeString(s)
	return err == nil
}

// RefHash returns the hash part of a reference (a base name or an absolute
// store path), or "".
func RefHash(ref string) string {
	base := ref[strings.LastIndexByte(ref, '/')+1:]
	if len(base) < 33 || base[32] != '-' || !IsHashPart(base[:32]) {
		return ""
	}
	return base[:32]
}

// Extension is the file extension Nix gives NARs compressed with method.
func Extension(method string) string {
	switch method {
	case "xz":
		return ".xz"
	case "bzip2":
		return ".bz2"
	case "zstd":
		return ".zst"
	case "br":
		return ".br"
	case "lzip":
		return ".lzip"
	case "lz4":
		return ".lz4"
	}
	return ""
}

// narMagic starts every NAR.
var narMagic = []byte("\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")

// MagicLen is how many leading bytes DetectCompression needs.
const MagicLen = 21

// DetectCompression names the compression of a file from its first bytes:
// "none" (a bare NAR), "zstd", "xz", "bzip2", "gzip", "lz4", or "" when it
// cannot tell (brotli streams have no magic number).
func DetectCompression(head []byte) string {
	switch {
	case bytes.HasPrefix(head, narMagic):
		return "none"
	case bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return "zstd"
	case bytes.HasPrefix(head, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}):
		return "xz"
	case bytes.HasPrefix(head, []byte("BZh")):
		return "bzip2"
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		return "gzip"
	case bytes.HasPrefix(head, []byte{0x04, 0x22, 0x4d, 0x18}):
		return "lz4"
	case bytes.HasPrefix(head, []byte("LZIP")):
		return "lzip"
	}
	return ""
}

// Decompress returns a reader of r decompressed with method (Nix's names).
func Decompress(method string, r io.Reader) (io.ReadCloser, error) {
	switch method {
	case "none":
		return io.NopCloser(r), nil
	case "zstd":
		d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	case "xz":
		d, err := xz.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(d), nil
	case "bzip2", "":
		return io.NopCloser(bzip2.NewReader(r)), nil
	case "br":
		return io.NopCloser(brotli.NewReader(r)), nil
	case "gzip":
		d, err := gzip.NewReader(r)
		if err != nil {
			return nil, err
		}
		return d, nil
	case "lz4":
		return io.NopCloser(lz4.NewReader(r)), nil
	}
	return nil, fmt.Errorf("compression %q: not supported here", method)
}

// DecodeContentEncoding undoes a narinfo's Content-Encoding (as an HTTP
// client would; narinfo-compression). More than MaxNarinfoSize bytes, before
// or after decoding, is an error wrapping ErrTooLarge.
func DecodeContentEncoding(encoding string, data []byte) (out []byte, err error) {
	if int64(len(data)) > MaxNarinfoSize {
		return nil, fmt.Errorf("%d bytes, more than the %d a narinfo may have: %w", len(data), MaxNarinfoSize, ErrTooLarge)
	}
	if encoding == "" || encoding == "identity" {
		return data, nil
	}
	// Decoders are fed untrusted bytes: a panic in one is an error here,
	// not the end of the process.
	defer func() {
		if p := recover(); p != nil {
			out, err = nil, fmt.Errorf("content-encoding %s: decoder failed: %v", encoding, p)
		}
	}()
	r, err := Decompress(encoding, bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("content-encoding %s: %w", encoding, err)
	}
	defer r.Close()
	out, err = io.ReadAll(io.LimitReader(r, MaxNarinfoSize+1))
	if err != nil {
		return nil, fmt.Errorf("content-encoding %s: %w", encoding, err)
	}
	if int64(len(out)) > MaxNarinfoSize {
		return nil, fmt.Errorf("content-encoding %s: decodes to more than the %d bytes a narinfo may have: %w", encoding, MaxNarinfoSize, ErrTooLarge)
	}
	return out, nil
}

// MaxNarinfoSize bounds a narinfo read from a cache, before and after its
// Content-Encoding is undone: 1 MiB holds over 10,000 references, and
// keeps the readers that read 32 narinfos at once (the collector, the
// audit) within a fixed memory bound whatever the bucket holds.
const MaxNarinfoSize = 1 << 20

// ErrTooLarge is wrapped by DecodeContentEncoding's error for a narinfo
// over MaxNarinfoSize.
var ErrTooLarge = errors.New("narinfo too large")
