package uploader

import (
	"bytes"
	"compress/bzip2"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/cachefmt"
)

// DefaultLogDir is where Nix keeps build logs.
const DefaultLogDir = "/nix/var/log/nix"

// maxLogSize bounds a build log read into memory for upload.
const maxLogSize = 64 << 20

// maxLogsRemembered bounds the record of derivations whose log was
// uploaded; beyond it the record starts over (a log may then be uploaded
// twice, which is harmless).
const maxLogsRemembered = 10000

// uploadLog uploads the build log of the derivation drv, if Nix kept one,
// as log/<drv basename> (what `nix-store --store <cache> --read-log` reads). It is
// best-effort: a missing or unreadable log never fails an upload.
func (u *Uploader) uploadLog(ctx context.Context, drv string) {
	base := filepath.Base(drv)
	if len(base) < 3 {
		return
	}
	u.logsMu.Lock()
	done := u.logsDone[base]
	u.logsDone[base] = true
	u.logsMu.Unlock()
	if done {
		return
	}
	data, err := readBuildLog(u.opt.LogDir, base)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err == nil {
		var body []byte
		if body, err = compressMeta(u.opt.Cache.LogCompression, data); err == nil {
			_, err = u.opt.Bucket.Put(ctx, cachefmt.Keys.Log(base), bytes.NewReader(body), int64(len(body)),
				bucket.PutOptions{ContentType: "text/plain; charset=utf-8", ContentEncoding: u.opt.Cache.LogCompression})
		}
	}
	if err != nil {
		u.logsMu.Lock()
		delete(u.logsDone, base) // try again with the next output of this derivation
		u.logsMu.Unlock()
		u.log.Warn("upload build log", "drv", drv, "err", err)
	}
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
