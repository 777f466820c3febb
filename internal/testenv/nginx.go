package testenv

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Nginx is an nginx server started for one test, serving a directory over
// HTTP with its DAV module accepting PUT and DELETE: an HTTP binary cache
// as Nix writes one.
type Nginx struct {
	Endpoint string // 127.0.0.1:PORT
	URL      string // http://127.0.0.1:PORT
	Root     string // the directory served: URL/x is Root/x
	dir      string
	cmd      *exec.Cmd
	done     chan struct{}
	stderr   *syncBuffer
}

// StartNginx starts nginx on a free port of 127.0.0.1, with its
// configuration, pid file, logs and temp files in a temporary directory,
// waits until it answers, and stops it at cleanup. nginx comes from `make
// tools` (Debian's nginx package, built with the DAV module). Writers
// ("login:password") are the accounts PUT and DELETE require (basic
// authentication); with none, anyone may write. Reads are open.
func StartNginx(t T, writers ...string) *Nginx {
	t.Helper()
	bin, ok := Lookup("nginx")
	if !ok {
		if _, err := os.Stat("/usr/sbin/nginx"); err != nil {
			Missing(t, "nginx (with its DAV module)")
		}
		bin = "/usr/sbin/nginx"
	}
	dir := t.TempDir()
	n := &Nginx{dir: dir, Root: filepath.Join(dir, "www"), done: make(chan struct{}), stderr: &syncBuffer{}}
	n.Endpoint = fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	n.URL = "http://" + n.Endpoint
	for _, d := range []string{n.Root, filepath.Join(dir, "tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatalf("%v", err)
		}
	}
	auth := ""
	if len(writers) > 0 {
		htpasswd := filepath.Join(dir, "htpasswd")
		var lines []string
		for _, w := range writers {
			login, pw, _ := strings.Cut(w, ":")
			lines = append(lines, login+":{PLAIN}"+pw)
		}
		if err := os.WriteFile(htpasswd, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			t.Fatalf("%v", err)
		}
		auth = fmt.Sprintf("limit_except GET HEAD { auth_basic \"cache\"; auth_basic_user_file %s; }", htpasswd)
	}
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;" // workers write the served directory as its owner
	}
	conf := fmt.Sprintf(`%s
daemon off;
master_process on;
worker_processes 1;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;
events { worker_connections 512; }
http {
	access_log %[2]s/access.log;
	client_body_temp_path %[2]s/tmp/body;
	proxy_temp_path %[2]s/tmp/proxy;
	fastcgi_temp_path %[2]s/tmp/fastcgi;
	uwsgi_temp_path %[2]s/tmp/uwsgi;
	scgi_temp_path %[2]s/tmp/scgi;
	default_type application/octet-stream;
	keepalive_requests 100000;
	server {
		listen %[3]s;
		root %[4]s;
		client_max_body_size 0;
		location / {
			dav_methods PUT DELETE;
			create_full_put_path on;
			dav_access user:rw group:r all:r;
			%[5]s
		}
	}
}
`, user, dir, n.Endpoint, n.Root, auth)
	confFile := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confFile, []byte(conf), 0o644); err != nil {
		t.Fatalf("%v", err)
	}
	n.cmd = exec.Command(bin, "-p", dir, "-c", confFile, "-e", filepath.Join(dir, "error.log"))
	n.cmd.Stdout, n.cmd.Stderr = n.stderr, n.stderr
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := n.cmd.Start(); err != nil {
		t.Fatalf("start nginx: %v", err)
	}
	go func() { n.cmd.Wait(); close(n.done) }()
	t.Cleanup(n.Stop)
	deadline := time.Now().Add(15 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get(n.URL + "/")
		if err == nil {
			resp.Body.Close()
			return n
		}
		select {
		case <-n.done:
			t.Fatalf("nginx exited at start: %s%s", n.stderr.String(), n.ErrorLog())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx did not answer on %s within 15s: %v\n%s", n.Endpoint, err, n.ErrorLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ErrorLog returns nginx's error log so far.
func (n *Nginx) ErrorLog() string {
	data, _ := os.ReadFile(filepath.Join(n.dir, "error.log"))
	return string(data)
}

// Requests returns the lines of the access log so far.
func (n *Nginx) Requests() []string {
	data, _ := os.ReadFile(filepath.Join(n.dir, "access.log"))
	return strings.Split(strings.TrimSpace(string(bytes.ToValidUTF8(data, nil))), "\n")
}

// Stop stops nginx (its process group: master and worker) and waits for it.
func (n *Nginx) Stop() {
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	select {
	case <-n.done:
		return
	default:
	}
	syscall.Kill(-n.cmd.Process.Pid, syscall.SIGQUIT)
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.done
	}
}
