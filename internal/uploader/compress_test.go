package uploader

import (
	"bytes"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/cacheurl"
)

// narLike returns n bytes that compress like a NAR: text and binary runs.
func narLike(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	var b bytes.Buffer
	b.WriteString("\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00")
	for b.Len() < n {
		if r.IntN(2) == 0 {
			b.WriteString(strings.Repeat("the quick brown fox jumps over the lazy dog ", 1+r.IntN(40)))
		} else {
			chunk := make([]byte, 1+r.IntN(512))
			for i := range chunk {
				chunk[i] = byte(r.UintN(256))
			}
			b.Write(chunk)
		}
	}
	return b.Bytes()[:n]
}

func compressWith(t *testing.T, c *narCompressor, data []byte, small bool) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := c.wrap(&out, small)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestEveryWritableCompressionRoundTrips compresses NAR-like data with
// each method nixspool writes (small and large inputs, pooled encoders
// reused) and reads it back with the decoders the audit uses; the file
// extension is Nix's, and the stream has the method's magic number.
func TestEveryWritableCompressionRoundTrips(t *testing.T) {
	small, large := narLike(4<<10), narLike(3<<20)
	for _, method := range cacheurl.WritableCompressions {
		t.Run(method, func(t *testing.T) {
			c, err := newNARCompressor(method, -1)
			if err != nil {
				t.Fatal(err)
			}
			if c.ext != cachefmt.Extension(method) {
				t.Errorf("extension %q, Nix names it %q", c.ext, cachefmt.Extension(method))
			}
			for i, in := range [][]byte{small, large, small, large} { // twice: pooled encoders are reused
				isSmall := len(in) == len(small)
				z := compressWith(t, c, in, isSmall)
				if method != "none" && len(z) >= len(in) {
					t.Errorf("%s did not compress %d bytes (%d out)", method, len(in), len(z))
				}
				if got := cachefmt.DetectCompression(z); got != "" && got != method {
					t.Errorf("round %d: stream looks like %s", i, got)
				}
				r, err := cachefmt.Decompress(method, bytes.NewReader(z))
				if err != nil {
					t.Fatal(err)
				}
				back, err := io.ReadAll(r)
				if err != nil {
					t.Fatalf("round %d: decompress: %v", i, err)
				}
				if !bytes.Equal(back, in) {
					t.Fatalf("round %d: %d bytes came back as %d different bytes", i, len(in), len(back))
				}
			}
		})
	}
}

func TestCompressionLevels(t *testing.T) {
	data := narLike(256 << 10)
	for method, levels := range map[string][]int{
		"zstd": {0, 1, 19}, "xz": {0, 9}, "gzip": {0, 1, 9}, "br": {0, 11}, "lz4": {1, 9}, "bzip2": {1, 9},
	} {
		for _, level := range levels {
			c, err := newNARCompressor(method, level)
			if err != nil {
				t.Fatalf("%s level %d: %v", method, level, err)
			}
			r, err := cachefmt.Decompress(method, bytes.NewReader(compressWith(t, c, data, false)))
			if err != nil {
				t.Fatal(err)
			}
			if back, err := io.ReadAll(r); err != nil || !bytes.Equal(back, data) {
				t.Fatalf("%s level %d does not round-trip: %v", method, level, err)
			}
		}
	}
	// Higher levels must make a difference (the level is really used).
	lo, _ := newNARCompressor("gzip", 1)
	hi, _ := newNARCompressor("gzip", 9)
	if a, b := len(compressWith(t, lo, data, false)), len(compressWith(t, hi, data, false)); b >= a {
		t.Errorf("gzip level 9 gave %d bytes, level 1 %d", b, a)
	}
	for method, level := range map[string]int{"zstd": 23, "xz": 10, "gzip": 10, "br": 12, "lz4": 10, "bzip2": 10} {
		if _, err := newNARCompressor(method, level); err == nil || !strings.Contains(err.Error(), "compression-level") {
			t.Errorf("%s level %d accepted (%v)", method, level, err)
		}
	}
	for _, method := range []string{"lzip", "lzma"} {
		if _, err := newNARCompressor(method, -1); err == nil {
			t.Errorf("%s accepted; nixspool does not write it", method)
		}
	}
}

// TestSingleThreaded: parallel=false still round-trips for large inputs.
func TestSingleThreaded(t *testing.T) {
	data := narLike(3 << 20)
	for _, method := range []string{"zstd", "lz4"} {
		c, err := newNARCompressorThreads(method, -1, false)
		if err != nil || c.multi {
			t.Fatalf("%s: %v, multi=%v", method, err, c.multi)
		}
		r, _ := cachefmt.Decompress(method, bytes.NewReader(compressWith(t, c, data, false)))
		if back, err := io.ReadAll(r); err != nil || !bytes.Equal(back, data) {
			t.Fatalf("%s single-threaded does not round-trip: %v", method, err)
		}
	}
}

// TestCompressionIsDeterministic: every writable compression gives the
// same bytes for the same NAR (the start-up check agrees), which a NAR put
// back after a cache reset relies on.
func TestCompressionIsDeterministic(t *testing.T) {
	for _, m := range cacheurl.WritableCompressions {
		c, err := newNARCompressor(m, -1)
		if err != nil {
			t.Fatal(err)
		}
		ok, err := c.deterministic()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			t.Errorf("%s: compressing the same NAR twice gave different bytes", m)
		}
	}
}
