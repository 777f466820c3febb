// Package nar serialises a file system tree as a Nix archive (NAR), byte for
// byte as `nix-store --dump` does, optionally building the `.ls` listing
// Nix writes with write-nar-listing=true.
//
// It exists instead of go-nix's nar.DumpPath for two reasons: go-nix's writer
// rejects entries whose names begin with ".." (such as Kubernetes-style
// "..data" symlink farms), so those paths could not be uploaded at all; and a
// direct serialiser avoids the writer's per-entry path validation, which is
// the main cost for trees of many small files.
package nar

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

// Node is one entry of a NAR listing (the `.ls` JSON format, version 1).
type Node struct {
	Type       string            `json:"type"` // "regular", "directory" or "symlink"
	Size       *uint64           `json:"size,omitempty"`
	Executable bool              `json:"executable,omitempty"`
	NarOffset  *uint64           `json:"narOffset,omitempty"`
	Target     string            `json:"target,omitempty"`
	Entries    *map[string]*Node `json:"entries,omitempty"`
}

// Listing is the `.ls` document.
type Listing struct {
	Version int   `json:"version"`
	Root    *Node `json:"root"`
}

// Dump writes the NAR of the tree at path to w. If listing is true it also
// returns the tree's listing. It returns the number of bytes written.
func Dump(w io.Writer, path string, listing bool) (int64, *Listing, error) {
	b := buffers.Get().(*dumpBuffers)
	defer buffers.Put(b)
	b.w.Reset(w)
	defer b.w.Reset(nil)
	d := &dumper{w: b.w, listing: listing, buf: b.copyBuf}
	d.str("nix-archive-1")
	root, err := d.node(path)
	if err == nil {
		err = d.err
	}
	if err == nil {
		err = d.w.Flush()
	}
	if err != nil {
		return d.n, nil, fmt.Errorf("dump %s: %w", path, err)
	}
	var ls *Listing
	if listing {
		ls = &Listing{Version: 1, Root: root}
	}
	return d.n, ls, nil
}

// dumpBuffers are reused across dumps: allocating (and zeroing) half a
// megabyte per path showed up as the top cost of uploading tiny paths.
type dumpBuffers struct {
	w       *bufio.Writer
	copyBuf []byte
}

var buffers = sync.Pool{New: func() any {
	return &dumpBuffers{w: bufio.NewWriterSize(nil, 256<<10), copyBuf: make([]byte, 256<<10)}
}}

type dumper struct {
	w       *bufio.Writer
	n       int64
	err     error
	listing bool
	buf     []byte
	pad     [8]byte
}

func (d *dumper) write(b []byte) {
	if d.err != nil {
		return
	}
	n, err := d.w.Write(b)
	d.n += int64(n)
	d.err = err
}

func (d *dumper) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	d.write(b[:])
}

func (d *dumper) str(s string) {
	d.u64(uint64(len(s)))
	if d.err == nil {
		n, err := d.w.WriteString(s)
		d.n += int64(n)
		d.err = err
	}
	d.padTo(uint64(len(s)))
}

func (d *dumper) padTo(n uint64) {
	if r := n % 8; r != 0 {
		d.write(d.pad[:8-r])
	}
}

func (d *dumper) node(path string) (*Node, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	d.str("(")
	d.str("type")
	var ln *Node
	switch mode := fi.Mode(); {
	case mode.IsRegular():
		ln, err = d.regular(path, fi)
	case mode&os.ModeSymlink != 0:
		target, lerr := os.Readlink(path)
		if lerr != nil {
			return nil, lerr
		}
		d.str("symlink")
		d.str("target")
		d.str(target)
		ln = &Node{Type: "symlink", Target: target}
	case mode.IsDir():
		ln, err = d.directory(path)
	default:
		return nil, fmt.Errorf("%s: unsupported file type %v", path, mode.Type())
	}
	if err != nil {
		return nil, err
	}
	d.str(")")
	if !d.listing {
		ln = nil
	}
	return ln, d.err
}

func (d *dumper) regular(path string, fi os.FileInfo) (*Node, error) {
	d.str("regular")
	exec := fi.Mode()&0o100 != 0
	if exec {
		d.str("executable")
		d.str("")
	}
	d.str("contents")
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size := uint64(fi.Size())
	d.u64(size)
	offset := uint64(d.n)
	if d.err != nil {
		return nil, d.err
	}
	n, err := io.CopyBuffer(onlyWriter{d.w}, io.LimitReader(f, int64(size)), d.buf)
	d.n += n
	if err != nil {
		return nil, err
	}
	if uint64(n) != size {
		return nil, fmt.Errorf("%s: file changed size while being read", path)
	}
	d.padTo(size)
	return &Node{Type: "regular", Size: &size, Executable: exec, NarOffset: &offset}, nil
}

func (d *dumper) directory(path string) (*Node, error) {
	d.str("directory")
	ents, err := os.ReadDir(path) // sorted by name, byte-wise, as Nix wants
	if err != nil {
		return nil, err
	}
	entries := map[string]*Node{}
	for _, e := range ents {
		d.str("entry")
		d.str("(")
		d.str("name")
		d.str(e.Name())
		d.str("node")
		child, err := d.node(filepath.Join(path, e.Name()))
		if err != nil {
			return nil, err
		}
		d.str(")")
		if d.listing {
			entries[e.Name()] = child
		}
	}
	return &Node{Type: "directory", Entries: &entries}, nil
}

// onlyWriter hides bufio.Writer's ReadFrom so io.CopyBuffer uses our
// buffer (and large reads) instead of many small ones.
type onlyWriter struct{ w io.Writer }

func (o onlyWriter) Write(p []byte) (int, error) { return o.w.Write(p) }
