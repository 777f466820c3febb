package cachefmt

import (
	"bytes"
	"errors"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// TestDecodeContentEncodingBounded: a compression bomb posing as a
// narinfo is refused with ErrTooLarge once it decodes past the limit,
// never truncated into something that parses, and a decoder's panic on
// hostile bytes is an error.
func TestDecodeContentEncodingBounded(t *testing.T) {
	var bomb bytes.Buffer
	zw, _ := zstd.NewWriter(&bomb)
	zw.Write(bytes.Repeat([]byte("References: "), 64<<20/12))
	zw.Close()
	if bomb.Len() > MaxNarinfoSize {
		t.Fatalf("bomb of %d bytes: not small enough to test decoding", bomb.Len())
	}
	out, err := DecodeContentEncoding("zstd", bomb.Bytes())
	if !errors.Is(err, ErrTooLarge) || out != nil {
		t.Fatalf("bomb: got %d bytes, err %v; want ErrTooLarge", len(out), err)
	}
	if _, err := DecodeContentEncoding("xz", []byte("\xfd7zXZ\x00garbage")); err == nil {
		t.Fatal("garbage decoded without an error")
	}
	plain := []byte("StorePath: /nix/store/x\n")
	if out, err := DecodeContentEncoding("", plain); err != nil || !bytes.Equal(out, plain) {
		t.Fatalf("identity: %q, %v", out, err)
	}
}
