package awscreds

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nixspool/nixspool/internal/testenv"
)

// putWith writes an object into m's bucket with v, which must work.
func putWith(t *testing.T, m *testenv.MinIO, v credentials.Value) {
	t.Helper()
	c, err := minio.New(m.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(v.AccessKeyID, v.SecretAccessKey, v.SessionToken)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PutObject(context.Background(), m.Bucket, "probe", strings.NewReader("x"), 1, minio.PutObjectOptions{}); err != nil {
		t.Fatalf("put with the retrieved credentials: %v", err)
	}
}

// A role profile: AssumeRole at MinIO's STS with the keys of its
// source_profile gives session credentials that MinIO accepts.
func TestRoleProfileAssumesRoleAtMinIO(t *testing.T) {
	m := testenv.StartMinIO(t)
	dir := isolate(t)
	t.Setenv("AWS_ENDPOINT_URL_STS", "http://"+m.Endpoint)
	writeFile(t, filepath.Join(dir, "credentials"), fmt.Sprintf("[base]\naws_access_key_id = %s\naws_secret_access_key = %s\n", m.AccessKey, m.SecretKey), 0o600)
	writeFile(t, filepath.Join(dir, "config"), "[profile uploader]\nrole_arn = arn:aws:iam::123456789012:role/cache-writer\nsource_profile = base\nduration_seconds = 900\nregion = us-east-1\n", 0o600)
	v, c := retrieve(t, Options{Profile: "uploader"})
	if want := "profile uploader (assume role arn:aws:iam::123456789012:role/cache-writer with profile base)"; c.Describe() != want {
		t.Fatalf("Describe = %q, want %q", c.Describe(), want)
	}
	if v.AccessKeyID == m.AccessKey || v.SessionToken == "" || time.Until(v.Expiration) > 16*time.Minute || time.Until(v.Expiration) < 10*time.Minute {
		t.Fatalf("got key %q, token %t, expiring in %v: not a 15-minute session", v.AccessKeyID, v.SessionToken != "", time.Until(v.Expiration))
	}
	putWith(t, m, v)
	if c.IsExpired() {
		t.Fatal("fresh session counts as expired")
	}

	// Wrong source keys: STS refuses, and the error says where.
	writeFile(t, filepath.Join(dir, "credentials"), fmt.Sprintf("[base]\naws_access_key_id = %s\naws_secret_access_key = wrong-secret\n", m.AccessKey), 0o600)
	if v, c := retrieve(t, Options{Profile: "uploader"}); v.AccessKeyID != "" || !strings.Contains(c.Describe(), "sts AssumeRole") {
		t.Fatalf("wrong source keys: got %q, %q", v.AccessKeyID, c.Describe())
	}
}

// credential_process runs without a shell, with or without arguments, and
// its JSON (with Expiration) is used.
func TestCredentialProcess(t *testing.T) {
	m := testenv.StartMinIO(t)
	dir := isolate(t)
	script := filepath.Join(dir, "helper")
	writeFile(t, script, fmt.Sprintf(`#!/bin/sh
[ "$#" -le 1 ] || exit 3
echo "${1:-none}" > %q
cat <<JSON
{"Version": 1, "AccessKeyId": %q, "SecretAccessKey": %q, "Expiration": "$(date -u -d '+1 hour' +%%Y-%%m-%%dT%%H:%%M:%%SZ)"}
JSON
`, filepath.Join(dir, "arg"), m.AccessKey, m.SecretKey), 0o755)
	for _, cmd := range []string{script, script + ` "an argument"`} {
		writeFile(t, filepath.Join(dir, "config"), "[profile p]\ncredential_process = "+cmd+"\n", 0o600)
		v, c := retrieve(t, Options{Profile: "p"})
		if c.Describe() != "profile p (credential_process)" || v.AccessKeyID != m.AccessKey {
			t.Fatalf("%s: got %q from %q", cmd, v.AccessKeyID, c.Describe())
		}
		if d := time.Until(v.Expiration); d < 55*time.Minute || d > 61*time.Minute {
			t.Fatalf("%s: Expiration in %v, want an hour", cmd, d)
		}
		putWith(t, m, v)
	}
	if got := testenv.Trim(readFile(t, filepath.Join(dir, "arg"))); got != "an argument" {
		t.Fatalf("the quoted argument arrived as %q", got)
	}

	// Output that is not credentials: an error naming the helper, not its output.
	writeFile(t, filepath.Join(dir, "config"), "[profile p]\ncredential_process = /bin/echo {\"Version\":1,\"AccessKeyId\":\"SECRETISH\"\n", 0o600)
	if _, c := retrieve(t, Options{Profile: "p"}); !strings.Contains(c.Describe(), "credential_process /bin/echo") || strings.Contains(c.Describe(), "SECRETISH") {
		t.Fatalf("bad output: %q", c.Describe())
	}
}
