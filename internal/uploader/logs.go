package uploader

import (
	"bytes"
	"compress/bzip2"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
)

// DefaultLogDir is where Nix keeps build logs.
const DefaultLogDir = "/nix/var/log/nix"

// maxLogSize bounds a build log read into memory for upload.
const maxLogSize = 64 << 20

// maxLogsRemembered bounds the record of derivations whose log was
// uploaded; beyond it the record starts over (a log may then be uploaded
// twice, which is harmless).
const maxLogsRemembered = 10000

// buildLogs uploads build logs, once per derivation.
type buildLogs struct {
	bucket      bucket.Bucket
	dir         string // where Nix keeps them (Options.LogDir)
	compression string // the cache's log compression
	log         *slog.Logger

	mu   sync.Mutex
	done map[string]bool // drv base name → build log uploaded (or being)
}

func newBuildLogs(b bucket.Bucket, dir, compression string, log *slog.Logger) *buildLogs {
	return &buildLogs{bucket: b, dir: dir, compression: compression, log: log, done: map[string]bool{}}
}

// upload uploads the build log of the derivation drv, if Nix kept one,
// as log/<drv basename> (what `nix-store --store <cache> --read-log` reads). It is
// best-effort: a missing or unreadable log never fails an upload.
func (l *buildLogs) upload(ctx context.Context, drv string) {
	base := filepath.Base(drv)
	if len(base) < 3 {
		return
	}
	l.mu.Lock()
	done := l.done[base]
	l.done[base] = true
	l.mu.Unlock()
	if done {
		return
	}
	data, err := readBuildLog(l.dir, base)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err == nil {
		var body []byte
		if body, err = compressMeta(l.compression, data); err == nil {
			_, err = l.bucket.Put(ctx, cachefmt.Keys.Log(base), bytes.NewReader(body), int64(len(body)),
				bucket.PutOptions{ContentType: "text/plain; charset=utf-8", ContentEncoding: l.compression})
		}
	}
	if err != nil {
		l.mu.Lock()
		delete(l.done, base) // try again with the next output of this derivation
		l.mu.Unlock()
		l.log.Warn("upload build log", "drv", drv, "err", err)
	}
}

// prune bounds the record of derivations whose log was uploaded.
func (l *buildLogs) prune() {
	l.mu.Lock()
	if len(l.done) > maxLogsRemembered {
		l.done = map[string]bool{}
	}
	l.mu.Unlock()
}

// readBuildLog reads Nix's log of the derivation with base name base:
// <logDir>/drvs/<2 chars>/<rest>[.bz2].
func readBuildLog(logDir, base string) ([]byte, error) {
	p := filepath.Join(logDir, "drvs", base[:2], base[2:])
	if f, err := os.Open(p + ".bz2"); err == nil {
		defer f.Close()
		return readLimited(bzip2.NewReader(f))
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readLimited(f)
}

func readLimited(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxLogSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxLogSize {
		return nil, fmt.Errorf("build log larger than %d bytes", maxLogSize)
	}
	return data, nil
}
