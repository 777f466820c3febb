package e2e

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/protocol"
	"github.com/nixspool/nixspool/storepath"
)

// withoutFlag drops a flag and its value from args.
func withoutFlag(args []string, flag string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if args[i] == flag {
			i++
			continue
		}
		out = append(out, args[i])
	}
	return out
}

// TestEndpointURLWithKeyInURL pastes the kind of URL a `nix copy --to`
// user has: the endpoint as a URL (no scheme=), the signing key as
// secret-key= and parameters that mean nothing to an uploader. agentd runs
// without --secret-key-file, the hook queues a real build, and stock Nix
// verifies and substitutes what went to MinIO.
func TestEndpointURLWithKeyInURL(t *testing.T) {
	testenv.RequireNix(t)
	m := testenv.StartMinIO(t)
	sk, pk := keyPair(t, "e2e-urls-1")
	cache := fmt.Sprintf("s3://%s?endpoint=http://%s&secret-key=%s&storage-class=STANDARD&index-debug-info=true&trusted=1&compression=zstd&parallel-compression=true",
		m.Bucket, m.Endpoint, sk)
	a := newAgent(t, cache, sk, m.Env())
	a.args = withoutFlag(a.args, "--secret-key-file")
	a.Start()

	g := testenv.WriteGraph(t, t.TempDir(), true)
	top := build(t, testenv.NixEnv(hookConfig(), a.HookEnv()...), g)
	s := a.WaitDrained(2 * time.Minute)
	if s.Failed != 0 || s.Uploaded != testenv.GraphPaths {
		t.Fatalf("status = %+v, want %d uploaded and none failed", s, testenv.GraphPaths)
	}
	verifyCache(t, m.HTTPURL(), pk, top)

	logs := a.log.String()
	var noEffect []string
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, "cache URL parameters with no effect here") {
			noEffect = append(noEffect, line)
		}
	}
	if len(noEffect) != 1 || !strings.Contains(noEffect[0], "index-debug-info") || !strings.Contains(noEffect[0], "trusted") ||
		strings.Contains(noEffect[0], "parallel-compression") || strings.Contains(noEffect[0], "storage-class") {
		t.Errorf("want one log line naming index-debug-info and trusted only, got %q", noEffect)
	}
	secret, err := os.ReadFile(sk)
	if err != nil {
		t.Fatal(err)
	}
	_, material, _ := strings.Cut(strings.TrimSpace(string(secret)), ":")
	out, err := a.Ctl("doctor")
	if err != nil {
		t.Fatalf("doctor: %v\n%s", err, out)
	}
	if !strings.Contains(out, "cache URL parameters") || !strings.Contains(out, "no effect here: index-debug-info, trusted") {
		t.Errorf("doctor does not list the parameters with no effect:\n%s", out)
	}
	if !strings.Contains(out, pk) {
		t.Errorf("doctor does not show the URL key's public key %s:\n%s", pk, out)
	}
	if strings.Contains(logs, material) || strings.Contains(out, material) {
		t.Error("the secret key appears in agentd's log or in doctor's output")
	}
}

// TestCompressionsStockNixReads: every NAR compression nixspool writes
// besides zstd, xz and none (TestXZAndNoCompression), read back by stock
// Nix from a file:// cache.
func TestCompressionsStockNixReads(t *testing.T) {
	testenv.RequireNix(t)
	sk, pk := keyPair(t, "e2e-comp-1")
	p := testenv.AddTextPath(t, "compressions", strings.Repeat("nixspool compresses this line\n", 2000))
	for _, q := range []string{"compression=br", "compression=gzip&compression-level=9", "compression=lz4", "compression=xz&compression-level=1", "compression=bzip2"} {
		comp := strings.TrimPrefix(strings.SplitN(q, "&", 2)[0], "compression=")
		cacheDir := filepath.Join(t.TempDir(), "cache")
		a := newAgent(t, "file://"+cacheDir+"?"+q, sk, nil, "--skip-signed-by=")
		a.Start()
		if out, err := a.Ctl("push", p); err != nil {
			t.Fatalf("push: %v\n%s", err, out)
		}
		if out, err := a.Ctl("wait", "--timeout", "1m"); err != nil {
			t.Fatalf("%s: wait: %v\n%s", q, err, out)
		}
		ni, err := os.ReadFile(filepath.Join(cacheDir, storepath.HashPart(p)+".narinfo"))
		if err != nil || !strings.Contains(string(ni), "Compression: "+comp+"\n") {
			t.Fatalf("narinfo with %s: %v\n%s", q, err, ni)
		}
		verifyCache(t, "file://"+cacheDir, pk, p)
		a.Kill()
	}
}

// unitSetting reads Key= from the [Socket] section of the shipped unit.
func unitSetting(t *testing.T, key string) string {
	t.Helper()
	f, err := os.Open(filepath.Join(testenv.RepoRoot(), "systemd", "nixspool.socket"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), key+"="); ok {
			return v
		}
	}
	t.Fatalf("systemd/nixspool.socket has no %s=", key)
	return ""
}

// activatedSocket creates a listening unix socket the way systemd does for
// nixspool.socket: the directory with DirectoryMode (root:root), the socket
// with SocketMode, owned by root and gid.
func activatedSocket(t *testing.T, dir string, dirMode os.FileMode, gid int) (string, *os.File) {
	t.Helper()
	if err := os.Mkdir(dir, dirMode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, dirMode); err != nil { // no umask
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agentd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	mode, err := strconv.ParseUint(unitSetting(t, "SocketMode"), 8, 32)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sock, 0, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, os.FileMode(mode)); err != nil {
		t.Fatal(err)
	}
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return sock, f
}

// localUser is a user made for one test, removed afterwards.
type localUser struct {
	name     string
	uid, gid int
	groups   []uint32
}

func addUser(t *testing.T, name string, groups ...string) localUser {
	t.Helper()
	args := []string{"--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"}
	if len(groups) > 0 {
		args = append(args, "--groups", strings.Join(groups, ","))
	}
	if out, err := exec.Command("useradd", append(args, name)...).CombinedOutput(); err != nil {
		t.Fatalf("useradd %s: %v\n%s", name, err, out)
	}
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	lu := localUser{name: name}
	lu.uid, _ = strconv.Atoi(u.Uid)
	lu.gid, _ = strconv.Atoi(u.Gid)
	gids, _ := u.GroupIds()
	for _, g := range gids {
		n, _ := strconv.Atoi(g)
		lu.groups = append(lu.groups, uint32(n))
	}
	return lu
}

// as runs a command as u (with u's groups), returning combined output.
func (u localUser) run(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid), Groups: u.groups}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestSocketGroupMembersCanPush creates the socket as systemd does from
// systemd/nixspool.socket (and the NixOS module, which sets the same modes)
// with SocketGroup= a fresh group, hands it to agentd by socket activation,
// and runs agentctl as two fresh non-root users: the group's member can
// push (and the path is uploaded), the other is refused with a clear
// error. It also shows why the directory mode matters: in a 0750 root:root
// directory, as systemd makes it by default, the member is refused too.
func TestSocketGroupMembersCanPush(t *testing.T) {
	testenv.RequireNix(t)
	for _, tool := range []string{"useradd", "groupadd", "userdel", "groupdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, tool)
		}
	}
	sk, pk := keyPair(t, "e2e-group-1")
	id := testenv.Unique()
	group := "nxsg" + id
	if out, err := exec.Command("groupadd", group).CombinedOutput(); err != nil {
		t.Fatalf("groupadd: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("groupdel", group).Run() })
	g, err := user.LookupGroup(group)
	if err != nil {
		t.Fatal(err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	member := addUser(t, "nxsm"+id, group)
	outsider := addUser(t, "nxso"+id)

	// A world-traversable base (t.TempDir is root-only), with agentctl in it.
	base, err := os.MkdirTemp("", "nixspool-sockgroup-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(base, "agentctl")
	data, err := os.ReadFile(bin("agentctl"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ctl, data, 0o755); err != nil {
		t.Fatal(err)
	}

	dirMode, err := strconv.ParseUint(unitSetting(t, "DirectoryMode"), 8, 32)
	if err != nil {
		t.Fatal(err)
	}
	sock, lf := activatedSocket(t, filepath.Join(base, "run-nixspool"), os.FileMode(dirMode), gid)

	cacheDir := filepath.Join(t.TempDir(), "cache")
	state := filepath.Join(t.TempDir(), "state")
	args := []string{"--cache", "file://" + cacheDir, "--secret-key-file", sk, "--state-dir", state, "--gc-roots", "off", "--skip-signed-by="}
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`, bin("agentd")}, args...)...)
	cmd.Env = testenv.NixEnv("")
	cmd.ExtraFiles = []*os.File{lf}
	logs := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("agentd log:\n%s", logs.String())
		}
	})
	status := func() protocol.Status {
		var s protocol.Status
		testenv.Poll(t, 20*time.Second, "agentd to answer", func() bool {
			resp, err := protocol.Call(sock, &protocol.Request{Op: protocol.OpStatus}, time.Second)
			if err != nil || resp.Status == nil {
				return false
			}
			s = *resp.Status
			return true
		})
		return s
	}
	status()

	p := testenv.AddTextPath(t, "sockgroup", "pushed by a member of the socket group\n")
	out, err := member.run(ctl, "--socket", sock, "push", p)
	if err != nil {
		t.Fatalf("member of %s: push failed: %v\n%s", group, err, out)
	}
	testenv.Poll(t, time.Minute, "the member's path to be uploaded", func() bool { return status().Uploaded == 1 })
	if _, err := os.Stat(filepath.Join(cacheDir, storepath.HashPart(p)+".narinfo")); err != nil {
		t.Fatalf("the member's path is not in the cache: %v", err)
	}
	verifyCache(t, "file://"+cacheDir, pk, p)
	auditCache(t, "file://"+cacheDir, testenv.NixEnv(""))

	q := testenv.AddTextPath(t, "sockgroup-outsider", "pushed by someone else\n")
	out, err = outsider.run(ctl, "--socket", sock, "push", q)
	if err == nil || !strings.Contains(out, "permission denied") || strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Fatalf("outsider: push = %v, want one line saying permission denied:\n%s", err, out)
	}
	if s := status(); s.Uploaded != 1 || s.Pending != 0 {
		t.Fatalf("after the outsider's push: %+v", s)
	}

	// systemd's own choice for the directory (0750 root:root) keeps the
	// group out although the socket is theirs.
	closed, _ := activatedSocket(t, filepath.Join(base, "run-0750"), 0o750, gid)
	out, err = member.run(ctl, "--socket", closed, "status")
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("member through a 0750 root:root directory: %v\n%s", err, out)
	}
}
