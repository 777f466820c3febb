// Package atomicfile writes files so that readers, and a crash at any
// moment, see either no file or the complete one: write a temp file in the
// same directory, fsync it, rename it into place, fsync the directory.
package atomicfile

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// TempPrefix starts the names of temp files; directories holding atomic
// files can remove leftovers with this prefix after a crash.
const TempPrefix = ".tmp-"

// Write stores what r yields at path with mode perm. If size is not
// negative, r must yield exactly size bytes, else nothing is written.
func Write(path string, r io.Reader, size int64, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, TempPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return err
	}
	n, err := io.Copy(f, r)
	if err != nil {
		return fail(err)
	}
	if size >= 0 && n != size {
		return fail(fmt.Errorf("got %d bytes, want %d", n, size))
	}
	if err := f.Chmod(perm); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making renames and removals in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
