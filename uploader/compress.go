package uploader

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"sync"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// narCompressor makes the compressing writer for NAR files.
type narCompressor struct {
	method string // "zstd", "xz" or "none"
	ext    string
	pool   sync.Pool // *zstd.Encoder, reused: building one allocates its window and tables
	// smallPool holds single-threaded encoders for small NARs.
	smallPool sync.Pool
	level     zstd.EncoderLevel
}

func newNARCompressor(method string, level int) (*narCompressor, error) {
	c := &narCompressor{method: method}
	switch method {
	case "zstd":
		c.ext = ".zst"
		// klauspost's "Fastest" is the default here: zstd is the bottleneck
		// of a big upload on two cores, and Fastest keeps ~97% of the ratio
		// of level 3 (perf.md §3). compression-level=N picks another level.
		c.level = zstd.SpeedFastest
		if level > 0 {
			c.level = zstd.EncoderLevelFromZstd(level)
		}
	case "xz":
		c.ext = ".xz"
	case "none":
	default:
		return nil, fmt.Errorf("unsupported compression %q", method)
	}
	return c, nil
}

// wrap returns a writer compressing into w; closing it flushes the stream
// (it does not close w) and returns pooled state. small selects a
// single-threaded encoder: for tiny inputs, concurrent block encoding only
// adds goroutine hand-offs.
func (c *narCompressor) wrap(w io.Writer, small bool) (io.WriteCloser, error) {
	switch {
	case c.method == "zstd" && small:
		enc, _ := c.smallPool.Get().(*zstd.Encoder)
		if enc == nil {
			var err error
			enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(c.level), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1<<20))
			if err != nil {
				return nil, err
			}
		}
		enc.Reset(w)
		return &pooledZstd{Encoder: enc, pool: &c.smallPool}, nil
	case c.method == "zstd":
		enc, _ := c.pool.Get().(*zstd.Encoder)
		if enc == nil {
			var err error
			// Concurrent block encoding spreads one stream over both cores;
			// a 2 MiB window bounds the memory that costs (perf.md §5:
			// ~212 MB/s at ~175 MiB RSS versus ~108 MB/s single-threaded).
			enc, err = zstd.NewWriter(nil,
				zstd.WithEncoderLevel(c.level),
				zstd.WithEncoderConcurrency(2),
				zstd.WithConcurrentBlocks(true),
				zstd.WithWindowSize(2<<20),
			)
			if err != nil {
				return nil, err
			}
		}
		enc.Reset(w)
		return &pooledZstd{Encoder: enc, pool: &c.pool}, nil
	case c.method == "xz":
		return xz.NewWriter(w)
	default:
		return nopCloser{w}, nil
	}
}

type pooledZstd struct {
	*zstd.Encoder
	pool *sync.Pool
}

func (p *pooledZstd) Close() error {
	err := p.Encoder.Close()
	p.pool.Put(p.Encoder)
	return err
}

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
