// Package spool is the hook's fallback when agentd cannot be reached: each
// request is written as one file in the spool directory, atomically (temp
// file, fsync, rename, fsync of the directory), and agentd imports the files
// when it starts and periodically afterwards. A file is removed only after
// its paths are committed to the queue.
package spool

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nixspool/nixspool/internal/atomicfile"
)

// Entry is the content of one spool file.
type Entry struct {
	Paths    []string `json:"paths"`
	Drv      string   `json:"drv,omitempty"`
	Floating bool     `json:"floating,omitempty"` // the derivation has floating CA outputs
}

const suffix = ".json"

// badSuffix is added to the name of a file set aside.
const badSuffix = ".bad"

// maxFileSize bounds what Read accepts from one spool file.
const maxFileSize = 1 << 20

// Write stores e as a new file in dir (created 0700 if missing) and returns
// its path. The file is durable when Write returns.
func Write(dir string, e Entry) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("spool: %w", err)
	}
	data, err := json.Marshal(e)
	if err != nil {
		return "", fmt.Errorf("spool: %w", err)
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return "", fmt.Errorf("spool: %w", err)
	}
	name := strconv.FormatInt(time.Now().UnixNano(), 10) + "-" + strconv.Itoa(os.Getpid()) + "-" + hex.EncodeToString(rnd[:]) + suffix
	final := filepath.Join(dir, name)
	if err := atomicfile.Write(final, bytes.NewReader(data), int64(len(data)), 0o600); err != nil {
		return "", fmt.Errorf("spool: %w", err)
	}
	return final, nil
}

// Files lists the complete spool files in dir, oldest first. A missing
// directory holds no files.
func Files(dir string) ([]string, error) {
	l, err := Scan(dir)
	return l.Files, err
}

// Listing is what a spool directory holds.
type Listing struct {
	Files []string // requests waiting to be imported, oldest first
	Bad   []string // requests set aside (Quarantine), kept for an operator
	// Odd are entries no writer of the spool makes: symlinks, directories,
	// other names. They are never read.
	Odd []string
}

// Scan lists the spool directory dir (a missing one is empty). Temp files
// of writers are left out.
func Scan(dir string) (Listing, error) {
	var l Listing
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return l, nil
	}
	if err != nil {
		return l, err
	}
	for _, e := range ents {
		name, full := e.Name(), filepath.Join(dir, e.Name())
		switch {
		case strings.HasPrefix(name, atomicfile.TempPrefix):
		case !e.Type().IsRegular() || strings.HasPrefix(name, "."):
			l.Odd = append(l.Odd, full)
		case strings.HasSuffix(name, suffix):
			l.Files = append(l.Files, full)
		case strings.HasSuffix(name, suffix+badSuffix):
			l.Bad = append(l.Bad, full)
		default:
			l.Odd = append(l.Odd, full)
		}
	}
	sort.Strings(l.Files) // names start with a timestamp
	return l, nil
}

// Read decodes one spool file.
func Read(path string) (Entry, error) {
	var e Entry
	f, err := os.Open(path)
	if err != nil {
		return e, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return e, err
	}
	if fi.Size() > maxFileSize {
		return e, fmt.Errorf("spool file %s: larger than %d bytes", path, maxFileSize)
	}
	if err := json.NewDecoder(f).Decode(&e); err != nil {
		return e, fmt.Errorf("spool file %s: %w", path, err)
	}
	return e, nil
}

// Remove deletes an imported spool file and syncs the directory.
func Remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return atomicfile.SyncDir(filepath.Dir(path))
}

// Quarantine renames a spool file that cannot be imported so that it is not
// tried again, keeping it for an operator to inspect (renaming it back
// imports it again), and syncs the directory.
func Quarantine(path string) error {
	if err := os.Rename(path, path+badSuffix); err != nil {
		return fmt.Errorf("spool: set aside: %w", err)
	}
	return atomicfile.SyncDir(filepath.Dir(path))
}

// RemoveStaleTemps removes temp files of writers that died mid-write
// (older than age: a live writer finishes within its timeout).
func RemoveStaleTemps(dir string, age time.Duration) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), atomicfile.TempPrefix) {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > age {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}
