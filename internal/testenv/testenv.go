// Package testenv gives tests the real parts they run against: a MinIO
// server on 127.0.0.1 and the Nix command-line tools. When a part is missing
// the test is skipped, unless NIXSPOOL_REQUIRE_TOOLS=1 (set by `make test`
// and CI), in which case it fails: CI must never pass by skipping.
package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// T is the part of testing.TB the helpers use; *testing.T and
// *testing.B satisfy it, and so can a benchmark program's own type.
type T interface {
	Helper()
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
	TempDir() string
	Cleanup(func())
}

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(filepath.Dir(file)))
}

// Missing skips or fails the test because a required tool is absent.
func Missing(t T, what string) {
	t.Helper()
	if os.Getenv("NIXSPOOL_REQUIRE_TOOLS") == "1" {
		t.Fatalf("%s is required (NIXSPOOL_REQUIRE_TOOLS=1); run `make tools`", what)
	}
	t.Skipf("%s not available; run `make tools` (or `make test`, which installs it)", what)
}

// Lookup finds a tool in the project's tools folder or on PATH.
func Lookup(name string) (string, bool) {
	p := filepath.Join(RepoRoot(), ".tools", "bin", name)
	if _, err := os.Stat(p); err == nil {
		return p, true
	}
	p, err := exec.LookPath(name)
	return p, err == nil
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("%v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// MinIO is a MinIO server started for one test.
type MinIO struct {
	Endpoint  string // 127.0.0.1:PORT
	AccessKey string
	SecretKey string
	Bucket    string // created, with anonymous read access
	Dir       string
	cmd       *exec.Cmd
	bin       string
	t         T
}

// StartMinIO starts a MinIO server on a free port with its data in a
// temporary directory, creates a bucket readable anonymously (so stock Nix
// can use it as an http:// substituter) and stops the server at cleanup.
func StartMinIO(t T) *MinIO {
	t.Helper()
	return StartMinIOIn(t, t.TempDir())
}

// StartMinIOIn is StartMinIO with the data in dir, e.g. on a tmpfs so that
// a server standing in for a distant store does not share the local
// disk's write-back with the program under test.
func StartMinIOIn(t T, dir string) *MinIO {
	t.Helper()
	bin, ok := Lookup("minio")
	if !ok {
		Missing(t, "the minio server")
	}
	m := &MinIO{
		AccessKey: "nixspooltest",
		SecretKey: "secret-" + randHex(8),
		Bucket:    "cache-" + randHex(4),
		Dir:       dir,
		bin:       bin,
		t:         t,
	}
	m.Endpoint = fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	m.Start()
	t.Cleanup(m.Stop)
	m.MakeBucket(m.Bucket)
	return m
}

// MakeBucket creates a bucket that anyone may read (as a public cache
// bucket is), so stock Nix can use it as an http:// substituter.
func (m *MinIO) MakeBucket(name string) {
	m.t.Helper()
	c := m.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.MakeBucket(ctx, name, minio.MakeBucketOptions{}); err != nil {
		m.t.Fatalf("make bucket: %v", err)
	}
	policy := fmt.Sprintf(`{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":["*"]},"Action":["s3:GetObject"],"Resource":["arn:aws:s3:::%s/*"]}]}`, name)
	if err := c.SetBucketPolicy(ctx, name, policy); err != nil {
		m.t.Fatalf("set bucket policy: %v", err)
	}
}

// Start (re)starts the server process and waits until it answers.
func (m *MinIO) Start() {
	m.t.Helper()
	cmd := exec.Command(m.bin, "server", "--quiet", "--address", m.Endpoint, "--console-address", fmt.Sprintf("127.0.0.1:%d", FreePort(m.t)), m.Dir)
	cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+m.AccessKey, "MINIO_ROOT_PASSWORD="+m.SecretKey, "MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=1")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		m.t.Fatalf("start minio: %v", err)
	}
	m.cmd = cmd
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + m.Endpoint + "/minio/health/live")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("minio did not come up: %v\n%s", err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the server (it can be started again with Start).
func (m *MinIO) Stop() {
	if m.cmd == nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { m.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		m.cmd.Process.Kill()
		<-done
	}
	m.cmd = nil
}

// Client returns an admin client for inspecting the bucket.
func (m *MinIO) Client() *minio.Client {
	c, err := minio.New(m.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(m.AccessKey, m.SecretKey, "")})
	if err != nil {
		m.t.Fatalf("%v", err)
	}
	return c
}

// CacheURL is the s3:// address of the test bucket.
func (m *MinIO) CacheURL(params string) string { return m.BucketURL(m.Bucket, params) }

// BucketURL is the s3:// address of a bucket on this server.
func (m *MinIO) BucketURL(bucket, params string) string {
	u := fmt.Sprintf("s3://%s?endpoint=%s&scheme=http&region=us-east-1", bucket, m.Endpoint)
	if params != "" {
		u += "&" + params
	}
	return u
}

// HTTPURL is the address stock Nix reads the bucket from.
func (m *MinIO) HTTPURL() string { return "http://" + m.Endpoint + "/" + m.Bucket }

// Env is the environment carrying the server's credentials, as agentd
// would get them from its credentials file.
func (m *MinIO) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
}

// Keys lists every object key in the bucket.
func (m *MinIO) Keys(t T) []string {
	t.Helper()
	var keys []string
	for o := range m.Client().ListObjects(context.Background(), m.Bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatalf("%v", o.Err)
		}
		keys = append(keys, o.Key)
	}
	return keys
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Unique returns a string unique to this test run (for derivation names and
// nonces, so that every run really builds).
func Unique() string { return randHex(6) }

// Poll calls cond until it returns true or the deadline passes.
func Poll(t T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Trim removes surrounding white space (for command output).
func Trim(b []byte) string { return strings.TrimSpace(string(b)) }
