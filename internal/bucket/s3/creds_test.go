package s3

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/testenv"
)

// credsEnv clears the credential variables and points the shared files
// into a temporary directory, which it returns.
func credsEnv(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, v := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
		"AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL_STS"} {
		t.Setenv(v, "")
	}
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	return dir
}

func openCache(t *testing.T, u string) *Bucket {
	t.Helper()
	c, err := cacheurl.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// As in Nix, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY win over the profile
// that the cache URL names.
func TestEnvironmentCredentialsBeforeURLProfile(t *testing.T) {
	m := testenv.StartMinIO(t)
	dir := credsEnv(t)
	if err := os.WriteFile(filepath.Join(dir, "credentials"), []byte("[stale]\naws_access_key_id = OLDKEY\naws_secret_access_key = old-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	b := openCache(t, m.CacheURL("profile=stale"))
	if _, err := b.Put(context.Background(), "x", strings.NewReader("x"), 1, bucket.PutOptions{}); err != nil {
		t.Fatalf("put: %v", err)
	}
	if src := b.CredentialSource(context.Background()); src != "environment (AWS_ACCESS_KEY_ID)" {
		t.Fatalf("CredentialSource = %q", src)
	}
}

// expiryProxy stands before MinIO and refuses, as S3 does, any request
// signed with a key after the expiry its issuer claimed (read from
// dir/exp.KEY); it records the keys that signed part uploads.
type expiryProxy struct {
	*httptest.Server
	mu       sync.Mutex
	partKeys map[string]int
	refused  int
}

func startExpiryProxy(t *testing.T, m *testenv.MinIO, dir string) *expiryProxy {
	target, _ := url.Parse("http://" + m.Endpoint)
	rp := httputil.NewSingleHostReverseProxy(target)
	p := &expiryProxy{partKeys: map[string]int{}}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, cred, _ := strings.Cut(r.Header.Get("Authorization"), "Credential=")
		key, _, _ := strings.Cut(cred, "/")
		if b, err := os.ReadFile(filepath.Join(dir, "exp."+key)); err == nil {
			exp, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if time.Now().Unix() >= exp {
				p.mu.Lock()
				p.refused++
				p.mu.Unlock()
				w.WriteHeader(http.StatusBadRequest)
				fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>`)
				return
			}
		}
		if r.URL.Query().Get("partNumber") != "" {
			p.mu.Lock()
			p.partKeys[key]++
			p.mu.Unlock()
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(p.Close)
	return p
}

// slowReader gives n bytes at about rate bytes a second.
type slowReader struct {
	n, rate int64
}

func (s *slowReader) Read(p []byte) (int, error) {
	if s.n <= 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), s.n, 256<<10)]
	time.Sleep(time.Duration(int64(len(p)) * int64(time.Second) / s.rate))
	for i := range p {
		p[i] = byte(i)
	}
	s.n -= int64(len(p))
	return len(p), nil
}

// Credentials are renewed before they expire during a long upload: a
// credential_process hands out session keys (real ones, from MinIO's STS)
// that it says expire three seconds later, a proxy refuses each key from
// then on, and a multipart upload taking several lifetimes succeeds,
// signed by several keys in turn. (A 15-minute session and a 20-minute
// upload, scaled down.)
func TestCredentialsRenewedDuringMultipartUpload(t *testing.T) {
	m := testenv.StartMinIO(t)
	dir := credsEnv(t)
	const sessions = 20
	for i := range sessions {
		sts, err := credentials.NewSTSAssumeRole("http://"+m.Endpoint, credentials.STSAssumeRoleOptions{AccessKey: m.AccessKey, SecretKey: m.SecretKey, Location: "us-east-1", DurationSeconds: 900})
		if err != nil {
			t.Fatal(err)
		}
		v, err := sts.GetWithContext(&credentials.CredContext{Client: http.DefaultClient})
		if err != nil {
			t.Fatalf("AssumeRole at MinIO: %v", err)
		}
		line := v.AccessKeyID + " " + v.SecretAccessKey + " " + v.SessionToken + "\n"
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("keys.%d", i)), []byte(line), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	helper := filepath.Join(dir, "helper")
	script := fmt.Sprintf(`#!/bin/sh
set -e
d=%q
n=$(cat "$d/n" 2>/dev/null || echo 0)
echo $((n+1)) > "$d/n"
set -- $(cat "$d/keys.$n")
e=$(($(date +%%s) + 3))
echo $e > "$d/exp.$1"
printf '{"Version": 1, "AccessKeyId": "%%s", "SecretAccessKey": "%%s", "SessionToken": "%%s", "Expiration": "%%s"}\n' "$1" "$2" "$3" "$(date -u -d @$e +%%Y-%%m-%%dT%%H:%%M:%%SZ)"
`, dir)
	if err := os.WriteFile(helper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config"), []byte("[profile rotating]\ncredential_process = "+helper+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startExpiryProxy(t, m, dir)
	b := openCache(t, fmt.Sprintf("s3://%s?endpoint=%s&scheme=http&region=us-east-1&profile=rotating&multipart-chunk-size=%d", m.Bucket, p.URL, 5<<20))

	const size = 40 << 20 // 8 parts, about 10 s at 4 MiB/s
	start := time.Now()
	if _, err := b.Put(context.Background(), "nar/long.nar", &slowReader{n: size, rate: 4 << 20}, size, bucket.PutOptions{}); err != nil {
		t.Fatalf("multipart upload across expiring credentials: %v (refused %d requests)", err, p.refused)
	}
	took := time.Since(start)
	info, err := b.Stat(context.Background(), "nar/long.nar")
	if err != nil || info.Size != size {
		t.Fatalf("stat after upload: %+v, %v", info, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.refused != 0 || len(p.partKeys) < 3 {
		t.Fatalf("upload of %v: parts signed by %d keys (%v), %d requests refused as expired; want renewal before each expiry", took, len(p.partKeys), p.partKeys, p.refused)
	}
	t.Logf("upload of %v: parts signed by %d keys", took.Round(time.Millisecond), len(p.partKeys))
}
