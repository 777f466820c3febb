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

// WriteNew is Write for a file that must not exist yet: it fails with an
// error wrapping os.ErrExist, writing nothing, if path exists. Concurrent
// writers of the same path (in any process) cannot both succeed: the file
// is linked into place, which fails if the name is taken.
func WriteNew(path string, r io.Reader, size int64, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, TempPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	n, err := io.Copy(f, r)
	if err == nil && size >= 0 && n != size {
		err = fmt.Errorf("got %d bytes, want %d", n, size)
	}
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		return err // *LinkError wrapping EEXIST satisfies errors.Is(err, os.ErrExist)
	}
	return SyncDir(dir)
}
