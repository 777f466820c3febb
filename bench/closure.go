package main

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// closure is a set of store paths made for one bench row: a top path
// referring to every other one.
type closure struct {
	Top   string
	Deps  []string
	Bytes int64 // NAR bytes of the whole closure
}

// All is the closure's paths, dependencies first.
func (c *closure) All() []string { return append(append([]string(nil), c.Deps...), c.Top) }

// importClosure adds a closure of deps + 1 paths to the store: deps paths
// each holding one file of depSize bytes (random, so incompressible, if
// random is set, else text), and a top path that refers to all of them.
//
// Building that many derivations would take minutes; `nix-store --import`
// registers paths with their references from one stream in seconds. The
// stream is the format of `nix-store --export` (Nix's
// Store::exportPaths): for each path 1, its NAR, the magic 0x4558494e, the
// path, its references, the deriver, 0 (no legacy signature); then 0.
// Store path hashes are random, so every call makes new paths.
func importClosure(env []string, name string, deps, depSize int, random bool) (*closure, error) {
	c := &closure{}
	for i := 0; i < deps; i++ {
		c.Deps = append(c.Deps, newStorePath(fmt.Sprintf("%s-dep-%d", name, i)))
	}
	c.Top = newStorePath(name + "-top")

	cmd := exec.Command("nix-store", "--import")
	cmd.Env = env
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("nix-store --import: %w", err)
	}
	w := bufio.NewWriterSize(stdin, 1<<20)
	e := &exporter{w: w}
	content := make([]byte, depSize)
	for i, p := range c.Deps {
		if random {
			rand.Read(content)
		} else {
			fill := fmt.Sprintf("%s %d\n", p, i)
			for j := range content {
				content[j] = fill[j%len(fill)]
			}
		}
		c.Bytes += e.path(p, content, nil)
	}
	c.Bytes += e.path(c.Top, []byte(strings.Join(c.Deps, "\n")+"\n"), c.Deps)
	e.u64(0)
	werr := w.Flush()
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("nix-store --import: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	if werr != nil {
		return nil, fmt.Errorf("nix-store --import: %w", werr)
	}
	return c, nil
}

// deletePaths removes paths the bench made from the store.
func deletePaths(env []string, paths []string) {
	for len(paths) > 0 {
		n := min(len(paths), 2000)
		// Referrers first: delete the batch that holds the top paths last
		// in the list first.
		batch := paths[len(paths)-n:]
		paths = paths[:len(paths)-n]
		cmd := exec.Command("nix-store", append([]string{"--delete"}, batch...)...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "  (cleanup: nix-store --delete: %v: %s)\n", err, lastLine(string(out)))
		}
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func newStorePath(name string) string {
	h := make([]byte, 20)
	rand.Read(h)
	return "/nix/store/" + nixbase32.EncodeToString(h) + "-" + name
}

// exporter writes the `nix-store --export` stream.
type exporter struct {
	w   io.Writer
	err error
}

func (e *exporter) write(b []byte) {
	if e.err == nil {
		_, e.err = e.w.Write(b)
	}
}

func (e *exporter) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	e.write(b[:])
}

func (e *exporter) str(s string) {
	e.u64(uint64(len(s)))
	e.write([]byte(s))
	if pad := (8 - len(s)%8) % 8; pad > 0 {
		e.write(make([]byte, pad))
	}
}

// path writes one path whose contents is a single regular file and returns
// its NAR size.
func (e *exporter) path(p string, content []byte, refs []string) int64 {
	e.u64(1)
	cw := &countWriter{w: e.w}
	nw, err := nar.NewWriter(cw)
	if err == nil {
		err = nw.WriteHeader(&nar.Header{Path: "/", Type: nar.TypeRegular, Size: int64(len(content))})
	}
	if err == nil {
		_, err = nw.Write(content)
	}
	if err == nil {
		err = nw.Close()
	}
	if err != nil && e.err == nil {
		e.err = err
	}
	e.u64(0x4558494e)
	e.str(p)
	e.u64(uint64(len(refs)))
	for _, r := range refs {
		e.str(r)
	}
	e.str("") // deriver
	e.u64(0)  // no legacy signature
	return cw.n
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
