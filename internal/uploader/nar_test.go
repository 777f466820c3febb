package uploader

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// bytesRead returns how many bytes this process has read through read
// system calls so far (Linux's rchar), or false where that is not known.
func bytesRead(t *testing.T) (uint64, bool) {
	t.Helper()
	f, err := os.Open("/proc/self/io")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "rchar: "); ok {
			n, err := strconv.ParseUint(v, 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// TestGrownPathIsCutOff: a path whose file grew by far after Nix recorded
// its NarSize fails for good, naming both sizes, and the upload stops
// reading it just past the recorded size: neither memory (small NARs) nor
// the temp file (large ones, resumable or not) holds the grown contents.
func TestGrownPathIsCutOff(t *testing.T) {
	if _, ok := bytesRead(t); !ok {
		t.Skip("needs /proc/self/io to count the bytes read")
	}
	const grown = 64 << 20
	cases := []struct {
		name      string
		size      int
		resumable bool
	}{
		{"small", 1000, false},
		{"large", 2 << 20, false},
		{"resumable", 2 << 20, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t, 1, chain, size(tc.size))
			opt := Options{}
			rs := &memResume{}
			mp := &fakeMultipart{Bucket: w.b}
			if tc.resumable {
				opt.Bucket, opt.Resume, opt.ResumeAbove = mp, rs, 1
			}
			u := w.uploader(opt)
			p := w.paths[0]
			info := w.store.infos[p]
			if want := tc.name != "small"; u.nars.isLarge(info) != want {
				t.Fatalf("%s case: isLarge = %v", tc.name, !want)
			}
			// Sparse: the file reads as 64 MiB without taking the disk.
			if err := os.Truncate(p, grown); err != nil {
				t.Fatal(err)
			}
			before, _ := bytesRead(t)
			_, err := u.Upload(context.Background(), p)
			after, _ := bytesRead(t)

			if !IsPermanent(err) {
				t.Fatalf("upload of a grown path = %v, want a permanent error", err)
			}
			// The NAR dumper reads ahead at most half a megabyte.
			if read, bound := after-before, info.NarSize+4<<20; read > bound {
				t.Fatalf("read %d bytes for a path recorded at %d bytes (bound %d): the grown contents were streamed", read, info.NarSize, bound)
			}
			var ge *GrownError
			msg := err.Error()
			if !errors.As(err, &ge) || ge.Read <= info.NarSize || !strings.Contains(msg, p) ||
				!strings.Contains(msg, fmt.Sprint(info.NarSize)) || !strings.Contains(msg, fmt.Sprint(ge.Read)) {
				t.Fatalf("want a GrownError naming the path and both sizes (recorded %d): %v", info.NarSize, err)
			}
			if w.has(0) {
				t.Fatal("narinfo written for a grown path")
			}
			if left, _ := filepath.Glob(filepath.Join(w.dir, "tmp", "*")); len(left) != 0 {
				t.Fatalf("temp files left: %v", left)
			}
			if recs, _ := rs.Uploads(); len(recs) != 0 {
				t.Fatalf("resume records left: %d", len(recs))
			}
		})
	}
}
