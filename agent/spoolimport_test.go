package agent

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/nixspool/nixspool/nixstore"
	"github.com/nixspool/nixspool/realisation"
	"github.com/nixspool/nixspool/spool"
)

// TestSpoolFileTheDaemonRejectsDoesNotStallTheSpool: a floating request
// whose derivation the Nix daemon no longer knows (collected while agentd
// was away) does not hold up the files behind it; it is tried again at the
// next imports, then renamed *.bad. A daemon that cannot be reached charges
// no file an attempt.
func TestSpoolFileTheDaemonRejectsDoesNotStallTheSpool(t *testing.T) {
	a := testAgent(t)
	a.realiser = realisation.New(realisation.Options{})
	const gone = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-gone.drv"
	const next, later = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-next", "/nix/store/cccccccccccccccccccccccccccccccc-later"
	fs := &fakeStore{
		valid:  map[string]bool{next: true, later: true},
		drvErr: map[string]error{gone: &nixstore.DaemonError{Msg: "path '" + gone + "' is not valid"}},
	}
	a.checkStore = fs
	stuck, err := spool.Write(a.spoolDir(), spool.Entry{Drv: gone, Floating: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{next}}); err != nil {
		t.Fatal(err)
	}
	queued := func(p string) bool {
		jobs, _ := a.queue.List("", 10)
		for _, j := range jobs {
			if j.Path == p {
				return true
			}
		}
		return false
	}

	a.importSpool(context.Background())
	if !queued(next) {
		t.Fatal("the file behind the one the daemon rejects was not imported")
	}
	if _, err := os.Stat(stuck); err != nil {
		t.Fatalf("the rejected file was not kept for another attempt: %v", err)
	}

	// The daemon out of reach: nothing is charged.
	fs.mu.Lock()
	fs.drvErr[gone] = errors.New("connect to nix store: connection refused")
	fs.mu.Unlock()
	for range 2 * maxSpoolAttempts {
		a.importSpool(context.Background())
	}
	if _, err := os.Stat(stuck); err != nil {
		t.Fatalf("a file was renamed while the daemon was out of reach: %v", err)
	}

	fs.mu.Lock()
	fs.drvErr[gone] = &nixstore.DaemonError{Msg: "path '" + gone + "' is not valid"}
	fs.mu.Unlock()
	if _, err := spool.Write(a.spoolDir(), spool.Entry{Paths: []string{later}}); err != nil {
		t.Fatal(err)
	}
	for i := 1; ; i++ {
		a.importSpool(context.Background())
		if _, err := os.Stat(stuck + ".bad"); err == nil {
			break
		}
		if i > maxSpoolAttempts {
			t.Fatalf("the rejected file was not renamed to .bad after %d more imports", i)
		}
	}
	if !queued(later) {
		t.Fatal("a file written later was not imported")
	}
	if files, _ := spool.Files(a.spoolDir()); len(files) != 0 {
		t.Fatalf("spool files left: %v", files)
	}
}
