package testenv

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// VersityGW is a Versity S3 Gateway (github.com/versity/versitygw) started
// for one test: an S3 server independent of MinIO's code, serving a
// directory of the machine (its posix backend: a bucket is a directory, an
// object a file, metadata in extended attributes).
type VersityGW struct {
	s3Account
	Dir     string // the data: <Dir>/data holds the buckets
	sidecar string // metadata directory, where the file system has no user xattrs
	cmd     *exec.Cmd
	done    chan struct{}
	logs    *syncBuffer
	bin     string
}

// StartVersityGW starts the gateway on a free port of 127.0.0.1 with its
// data in a temporary directory, creates a bucket readable anonymously
// (through a bucket policy, as on MinIO) and stops the gateway at cleanup.
// The account's keys reach the gateway through its environment, never its
// command line.
func StartVersityGW(t T) *VersityGW {
	t.Helper()
	bin, ok := Lookup("versitygw")
	if !ok {
		Missing(t, "the versitygw S3 gateway")
	}
	v := &VersityGW{
		s3Account: s3Account{
			AccessKey: "nixspooltest",
			SecretKey: "secret-" + randHex(8),
			Bucket:    "cache-" + randHex(4),
			t:         t,
		},
		Dir: t.TempDir(),
		bin: bin,
	}
	v.Endpoint = fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	if err := os.MkdirAll(filepath.Join(v.Dir, "data"), 0o755); err != nil {
		t.Fatalf("%v", err)
	}
	// The posix backend keeps ETags and content types in user extended
	// attributes; where the file system has none (tmpfs on older
	// kernels), in a sidecar directory.
	if err := unix.Setxattr(v.Dir, "user.nixspool.probe", []byte("1"), 0); err != nil {
		v.sidecar = filepath.Join(v.Dir, "meta")
		if err := os.MkdirAll(v.sidecar, 0o755); err != nil {
			t.Fatalf("%v", err)
		}
	}
	t.Cleanup(v.Stop) // also if Start gives up on a running process
	v.Start()
	v.MakeBucket(v.Bucket)
	return v
}

// Kind implements S3Server.
func (v *VersityGW) Kind() string { return "versitygw" }

// Start implements S3Server: it (re)starts the gateway and waits until its
// health endpoint answers.
func (v *VersityGW) Start() {
	v.t.Helper()
	// Keep-alive is off by default (every answer closes its connection);
	// a deployment serving a cache turns it on.
	args := []string{"--port", v.Endpoint, "--health", "/health", "--quiet", "--keep-alive", "posix"}
	if v.sidecar != "" {
		args = append(args, "--sidecar", v.sidecar)
	}
	args = append(args, filepath.Join(v.Dir, "data"))
	cmd := exec.Command(v.bin, args...)
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+v.AccessKey, "ROOT_SECRET_ACCESS_KEY="+v.SecretKey)
	v.logs = &syncBuffer{}
	cmd.Stdout, cmd.Stderr = v.logs, v.logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		v.t.Fatalf("start versitygw: %v", err)
	}
	v.cmd = cmd
	v.done = make(chan struct{})
	go func() { cmd.Wait(); close(v.done) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-v.done:
			v.cmd = nil
			v.t.Fatalf("versitygw exited during start-up:\n%s", v.logs.String())
		default:
		}
		resp, err := http.Get("http://" + v.Endpoint + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("versitygw did not come up: %v\n%s", err, v.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop implements S3Server: SIGTERM, then SIGKILL after ten seconds.
func (v *VersityGW) Stop() {
	if v.cmd == nil {
		return
	}
	v.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-v.done:
	case <-time.After(10 * time.Second):
		v.cmd.Process.Kill()
		<-v.done
	}
	v.cmd = nil
}

// Logs returns what the gateway printed (start-up messages and errors).
func (v *VersityGW) Logs() string { return v.logs.String() }

// syncBuffer is a bytes.Buffer safe for a process's output and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
