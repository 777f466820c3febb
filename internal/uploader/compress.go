package uploader

import (
	"bytes"
	"fmt"
	"io"
	"sync"

	"github.com/andybalholm/brotli"
	"github.com/dsnet/compress/bzip2"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz"
)

// narCompressor makes the compressing writer for NAR files, for every
// compression Nix reads back that a maintained Go encoder writes (the cache
// URL's compression=, cacheurl.WritableCompressions). File extensions are
// Nix's own: gzip gets none.
type narCompressor struct {
	method string // one of cacheurl.WritableCompressions
	ext    string
	level  int  // compression-level; -1 is the method's default
	multi  bool // use two threads for large NARs (zstd, lz4)
	// pool holds encoders for large NARs and smallPool single-threaded
	// ones for small NARs: building an encoder allocates its window and
	// tables, which costs more than compressing a small NAR.
	pool      sync.Pool
	smallPool sync.Pool
	zlevel    zstd.EncoderLevel
}

// xzDictCaps are xz's dictionary sizes for presets 0 to 9, which
// compression-level picks for xz.
var xzDictCaps = [10]int{256 << 10, 1 << 20, 2 << 20, 4 << 20, 4 << 20, 8 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20}

// newNARCompressor returns the compressor for method at level (-1: the
// method's default), compressing large NARs on two threads where the
// method can (zstd, lz4).
func newNARCompressor(method string, level int) (*narCompressor, error) {
	return newNARCompressorThreads(method, level, true)
}

// newNARCompressorThreads is newNARCompressor; parallel=false compresses
// every NAR on one thread (parallel-compression=false).
func newNARCompressorThreads(method string, level int, parallel bool) (*narCompressor, error) {
	c := &narCompressor{method: method, level: level}
	bad := func(lo, hi int) error {
		return fmt.Errorf("compression-level %d: want %d to %d for %s, or -1", level, lo, hi, method)
	}
	switch method {
	case "zstd":
		c.ext = ".zst"
		c.multi = parallel
		// klauspost's "Fastest" is the default here: zstd is the bottleneck
		// of a big upload on two cores, and Fastest keeps ~97% of the ratio
		// of level 3 on NARs of typical closures. compression-level=N picks another level.
		c.zlevel = zstd.SpeedFastest
		if level > 22 {
			return nil, bad(0, 22)
		}
		if level > 0 {
			c.zlevel = zstd.EncoderLevelFromZstd(level)
		}
	case "xz":
		c.ext = ".xz"
		if level > 9 {
			return nil, bad(0, 9)
		}
	case "gzip":
		if level > 9 {
			return nil, bad(0, 9)
		}
	case "br":
		c.ext = ".br"
		if level > 11 {
			return nil, bad(0, 11)
		}
	case "lz4":
		c.ext = ".lz4"
		c.multi = parallel
		if level > 9 {
			return nil, bad(1, 9)
		}
	case "bzip2":
		c.ext = ".bz2"
		if level == 0 || level > 9 {
			return nil, bad(1, 9)
		}
	case "none":
	default:
		return nil, fmt.Errorf("unsupported compression %q", method)
	}
	if level < -1 {
		return nil, fmt.Errorf("compression-level %d: want -1 or more", level)
	}
	return c, nil
}

// resetter is an encoder that can be reused for another stream.
type resetter interface {
	io.WriteCloser
	Reset(io.Writer)
}

// wrap returns a writer compressing into w; closing it flushes the stream
// (it does not close w) and returns pooled state. small selects a
// single-threaded encoder: for tiny inputs, concurrent block encoding only
// adds goroutine hand-offs.
func (c *narCompressor) wrap(w io.Writer, small bool) (io.WriteCloser, error) {
	pool := &c.pool
	if small || !c.multi {
		pool = &c.smallPool
	}
	if enc, ok := pool.Get().(resetter); ok {
		enc.Reset(w)
		return &pooled{resetter: enc, pool: pool}, nil
	}
	threads := 1
	if pool == &c.pool {
		threads = 2
	}
	var enc resetter
	switch c.method {
	case "zstd":
		opts := []zstd.EOption{zstd.WithEncoderLevel(c.zlevel), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1 << 20)}
		if threads > 1 {
			// Concurrent block encoding spreads one stream over both
			// cores; a 2 MiB window bounds the memory that costs
			// (measured here: ~212 MB/s at ~175 MiB RSS versus
			// ~108 MB/s single-threaded).
			opts = []zstd.EOption{zstd.WithEncoderLevel(c.zlevel), zstd.WithEncoderConcurrency(2), zstd.WithConcurrentBlocks(true), zstd.WithWindowSize(2 << 20)}
		}
		z, err := zstd.NewWriter(w, opts...)
		if err != nil {
			return nil, err
		}
		enc = z
	case "lz4":
		z := lz4.NewWriter(w)
		level := lz4.Fast
		if c.level > 0 {
			level = lz4.CompressionLevel(1 << (8 + c.level))
		}
		if err := z.Apply(lz4.CompressionLevelOption(level), lz4.ConcurrencyOption(threads)); err != nil {
			return nil, fmt.Errorf("lz4: %w", err)
		}
		enc = z
	case "gzip":
		level := gzip.DefaultCompression
		if c.level >= 0 {
			level = c.level
		}
		z, err := gzip.NewWriterLevel(w, level)
		if err != nil {
			return nil, err
		}
		enc = z
	case "br":
		level := brotli.DefaultCompression
		if c.level >= 0 {
			level = c.level
		}
		enc = brotli.NewWriterLevel(w, level)
	case "bzip2":
		// Nix's bzip2 (libarchive) uses level 9 unless told otherwise.
		level := 9
		if c.level > 0 {
			level = c.level
		}
		z, err := bzip2.NewWriter(w, &bzip2.WriterConfig{Level: level})
		if err != nil {
			return nil, err
		}
		enc = bzip2Writer{z}
	case "xz":
		// ulikunitz/xz writers cannot be reset: one per NAR.
		cfg := xz.WriterConfig{}
		if c.level >= 0 {
			cfg.DictCap = xzDictCaps[c.level]
		}
		return cfg.NewWriter(w)
	default:
		return nopCloser{w}, nil
	}
	return &pooled{resetter: enc, pool: pool}, nil
}

// pooled returns its encoder to the pool when closed.
type pooled struct {
	resetter
	pool *sync.Pool
}

func (p *pooled) Close() error {
	err := p.resetter.Close()
	if err == nil {
		p.pool.Put(p.resetter)
	}
	return err
}

// bzip2Writer is a dsnet bzip2 writer as a resetter.
type bzip2Writer struct{ *bzip2.Writer }

func (b bzip2Writer) Reset(w io.Writer) { b.Writer.Reset(w) }

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// compressMeta compresses a small metadata object (narinfo, .ls) for a
// Content-Encoding that every Nix reader decodes.
func compressMeta(method string, data []byte) ([]byte, error) {
	var buf bytes.Buffer
	var w io.WriteCloser
	switch method {
	case "":
		return data, nil
	case "br":
		w = brotli.NewWriter(&buf)
	case "gzip":
		w = gzip.NewWriter(&buf)
	case "zstd":
		enc, err := zstd.NewWriter(&buf)
		if err != nil {
			return nil, err
		}
		w = enc
	default:
		return nil, fmt.Errorf("unsupported metadata compression %q", method)
	}
	if _, err := w.Write(data); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// deterministic reports whether compressing the same bytes twice gives the
// same bytes, for small and large NARs: what lets a NAR put back after a
// reset land at the key an earlier narinfo names. Checked once at start.
func (c *narCompressor) deterministic() (bool, error) {
	sample := make([]byte, 1<<20+1)
	var x uint32 = 2463534242
	for i := range sample {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		sample[i] = 'a' + byte(x%16) // compressible, not trivially
	}
	for _, small := range []bool{true, false} {
		sample := sample
		if small {
			sample = sample[:64<<10]
		}
		var first []byte
		for i := 0; i < 2; i++ {
			var out bytes.Buffer
			w, err := c.wrap(&out, small)
			if err != nil {
				return false, err
			}
			if _, err := w.Write(sample); err != nil {
				return false, err
			}
			if err := w.Close(); err != nil {
				return false, err
			}
			if i == 0 {
				first = out.Bytes()
			} else if !bytes.Equal(first, out.Bytes()) {
				return false, nil
			}
		}
	}
	return true, nil
}
