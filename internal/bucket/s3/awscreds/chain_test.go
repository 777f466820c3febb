package awscreds

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// The environment comes before the profile, even one the cache URL names.
func TestEnvironmentBeforeNamedProfile(t *testing.T) {
	dir := isolate(t)
	writeFile(t, filepath.Join(dir, "credentials"), "[ci]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n", 0o600)
	t.Setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
	t.Setenv("AWS_SESSION_TOKEN", "envtoken")
	v, c := retrieve(t, Options{Profile: "ci"})
	if v.AccessKeyID != "ENVKEY" || v.SessionToken != "envtoken" || c.Describe() != "environment (AWS_ACCESS_KEY_ID)" {
		t.Fatalf("got %s from %q, want the environment's key", v.AccessKeyID, c.Describe())
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	v, c = retrieve(t, Options{Profile: "ci"})
	if v.AccessKeyID != "FILEKEY" || c.Describe() != "profile ci" {
		t.Fatalf("without the environment: got %s from %q, want the profile's", v.AccessKeyID, c.Describe())
	}
}

// The profile comes from the config file ("profile NAME" sections) and the
// credentials file, the latter winning; AWS_PROFILE picks it without
// profile=.
func TestProfileFromBothFiles(t *testing.T) {
	dir := isolate(t)
	writeFile(t, filepath.Join(dir, "config"), "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = d\n[profile a]\naws_access_key_id = CONFKEY\naws_secret_access_key = c\n[sso-session x]\nsso_region = eu-west-1\n", 0o600)
	writeFile(t, filepath.Join(dir, "credentials"), "[a]\naws_secret_access_key = credsecret\n", 0o600)
	t.Setenv("AWS_PROFILE", "a")
	v, c := retrieve(t, Options{})
	if v.AccessKeyID != "CONFKEY" || v.SecretAccessKey != "credsecret" || c.Describe() != "profile a" {
		t.Fatalf("got %s/%s from %q", v.AccessKeyID, v.SecretAccessKey, c.Describe())
	}
	t.Setenv("AWS_PROFILE", "")
	if v, _ := retrieve(t, Options{}); v.AccessKeyID != "DEFKEY" {
		t.Fatalf("default profile: got %s", v.AccessKeyID)
	}
}

// With nothing configured the requests go unsigned, and Describe says why.
func TestNothingConfiguredIsAnonymous(t *testing.T) {
	isolate(t)
	v, c := retrieve(t, Options{Profile: "missing"})
	if v.SignerType != credentials.SignatureAnonymous || v.AccessKeyID != "" {
		t.Fatalf("got %+v, want anonymous", v)
	}
	d := c.Describe()
	if !strings.HasPrefix(d, "none") || !strings.Contains(d, "profile missing: no such profile") || !strings.Contains(d, "imds") {
		t.Fatalf("Describe = %q", d)
	}
	if c.IsExpired() {
		t.Fatal("anonymous credentials are looked up again at once")
	}
}

// A source_profile loop is an error, not a hang.
func TestSourceProfileLoop(t *testing.T) {
	dir := isolate(t)
	writeFile(t, filepath.Join(dir, "config"), "[profile a]\nrole_arn = arn:aws:iam::1:role/a\nsource_profile = b\n[profile b]\nrole_arn = arn:aws:iam::1:role/b\nsource_profile = a\n", 0o600)
	_, c := retrieve(t, Options{Profile: "a"})
	if d := c.Describe(); !strings.Contains(d, "loop") {
		t.Fatalf("Describe = %q, want the loop named", d)
	}
}

func TestSplitWords(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{"/bin/helper", []string{"/bin/helper"}},
		{"  helper  --a  b ", []string{"helper", "--a", "b"}},
		{`helper 'two words' "x \"y\" \z" a\ b ''`, []string{"helper", "two words", `x "y" \z`, "a b", ""}},
	} {
		got, err := splitWords(c.in)
		if err != nil || fmt.Sprint(got) != fmt.Sprint(c.want) || len(got) != len(c.want) {
			t.Errorf("splitWords(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "  ", "a 'b", `a "b`, `a\`} {
		if _, err := splitWords(bad); err == nil {
			t.Errorf("splitWords(%q) gave no error", bad)
		}
	}
}

// credentialServer is a local container credentials or instance metadata
// endpoint that hands out a new key each time, expiring after life.
type credentialServer struct {
	*httptest.Server
	hits atomic.Int32
}

func newCredentialServer(t *testing.T, life time.Duration, check func(r *http.Request) int) *credentialServer {
	s := &credentialServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if code := check(r); code != 0 {
			w.WriteHeader(code)
			return
		}
		n := s.hits.Add(1)
		json.NewEncoder(w).Encode(map[string]any{"Code": "Success", "AccessKeyId": fmt.Sprintf("KEY%d", n), "SecretAccessKey": "s",
			"Token": "tok", "Expiration": time.Now().Add(life).UTC().Format(time.RFC3339)})
	}))
	t.Cleanup(s.Close)
	return s
}

// ECS: the full URI on loopback with the token file's authorization, and
// the relative URI; with either set, IMDS is not asked.
func TestECSContainerCredentials(t *testing.T) {
	dir := isolate(t)
	var imdsHits atomic.Int32
	imds := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { imdsHits.Add(1) }))
	defer imds.Close()
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.URL)

	ecs := newCredentialServer(t, time.Hour, func(r *http.Request) int {
		if r.URL.Path != "/v2/creds" || r.Header.Get("Authorization") != "Bearer pod-token" {
			return http.StatusUnauthorized
		}
		return 0
	})
	writeFile(t, filepath.Join(dir, "token"), "Bearer pod-token\n", 0o600)
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.URL+"/v2/creds")
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "Bearer wrong") // the file wins
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", filepath.Join(dir, "token"))
	v, c := retrieve(t, Options{})
	if v.AccessKeyID != "KEY1" || v.SessionToken != "tok" || c.Describe() != "ecs (container credentials)" {
		t.Fatalf("full URI: got %q from %q", v.AccessKeyID, c.Describe())
	}

	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
	t.Setenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds")
	e := &ECS{Host: ecs.URL}
	if v, err := e.RetrieveWithCredContext(nil); err != nil || v.AccessKeyID != "KEY2" {
		t.Fatalf("relative URI: %q, %v", v.AccessKeyID, err)
	}

	// The endpoint fails: no fall-through to the instance's role.
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "")
	t.Setenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "")
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ecs.URL+"/v2/creds")
	if v, c := retrieve(t, Options{}); v.AccessKeyID != "" || !strings.Contains(c.Describe(), "401") {
		t.Fatalf("failing endpoint: got %q from %q", v.AccessKeyID, c.Describe())
	}
	if imdsHits.Load() != 0 {
		t.Fatalf("IMDS asked %d times with the ECS variables set", imdsHits.Load())
	}

	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://192.0.2.1/creds")
	if _, err := (&ECS{}).RetrieveWithCredContext(nil); err == nil || !strings.Contains(err.Error(), "neither https nor a loopback") {
		t.Fatalf("a plain-http full URI off loopback: %v", err)
	}
}

// IMDS: IMDSv2 token first, then the role name, then its credentials, each
// carrying the token; renewed before the expiry.
func TestIMDSInstanceCredentials(t *testing.T) {
	isolate(t)
	var tokens atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		tokens.Add(1)
		fmt.Fprint(w, "v2token")
	})
	creds := newCredentialServer(t, 3*time.Second, func(r *http.Request) int {
		if r.Header.Get("X-aws-ec2-metadata-token") != "v2token" {
			return http.StatusUnauthorized
		}
		return 0
	})
	mux.HandleFunc("GET /latest/meta-data/iam/security-credentials/", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-aws-ec2-metadata-token") != "v2token" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		fmt.Fprint(w, "builder-role\n")
	})
	mux.Handle("GET /latest/meta-data/iam/security-credentials/builder-role", creds.Config.Handler)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.URL)

	v, c := retrieve(t, Options{})
	if v.AccessKeyID != "KEY1" || c.Describe() != "imds (EC2 instance role)" || tokens.Load() != 1 {
		t.Fatalf("got %q from %q after %d tokens", v.AccessKeyID, c.Describe(), tokens.Load())
	}
	if c.IsExpired() {
		t.Fatal("fresh instance credentials count as expired")
	}
	// 80% of three seconds: renewed after about 2.4 s, before they expire.
	deadline := time.Now().Add(10 * time.Second)
	for !c.IsExpired() {
		if time.Now().After(deadline) {
			t.Fatal("instance credentials never due for renewal")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v.Expiration.Before(time.Now()) {
		t.Fatal("renewal came only after the credentials expired")
	}

	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	if v, _ := retrieve(t, Options{}); v.AccessKeyID != "" {
		t.Fatal("AWS_EC2_METADATA_DISABLED=true did not turn IMDS off")
	}
}

// An SSO profile is SSO's: its cached token is looked for (here missing,
// so the error says to log in), and the profile link leaves it alone.
func TestSSOProfileGoesToSSO(t *testing.T) {
	dir := isolate(t)
	writeFile(t, filepath.Join(dir, "config"), "[profile dev]\nsso_session = corp\nsso_account_id = 123456789012\nsso_role_name = CacheWriter\n[sso-session corp]\nsso_region = eu-west-1\nsso_start_url = https://corp.awsapps.com/start\n", 0o600)
	_, c := retrieve(t, Options{Profile: "dev"})
	d := c.Describe()
	if !strings.Contains(d, "sso (profile dev)") || !strings.Contains(d, "aws sso login") || strings.Contains(d, "profile dev has no credentials") {
		t.Fatalf("Describe = %q", d)
	}
}

// TestFailedRenewalIsAnError: once a source gave credentials, a renewal
// that finds none is an error (the request fails and the job is retried),
// never a turn to unsigned requests that the store refuses as forbidden.
func TestFailedRenewalIsAnError(t *testing.T) {
	dir := isolate(t)
	state := filepath.Join(dir, "state")
	script := filepath.Join(dir, "creds.sh")
	writeFile(t, script, "#!/bin/sh\nif [ -e "+state+" ]; then exit 1; fi\necho '{\"Version\":1,\"AccessKeyId\":\"AK\",\"SecretAccessKey\":\"SK\"}'\n", 0o755)
	writeFile(t, filepath.Join(dir, "config"), "[default]\ncredential_process = "+script+"\n", 0o600)
	v, c := retrieve(t, Options{})
	if v.AccessKeyID != "AK" {
		t.Fatalf("first retrieval: got %+v", v)
	}
	writeFile(t, state, "down", 0o600)
	v, err := c.RetrieveWithCredContext(&credentials.CredContext{Context: context.Background()})
	if err == nil {
		t.Fatalf("renewal with the source failing gave %+v (signer %v), want an error", v, v.SignerType)
	}
	if !strings.HasPrefix(c.Describe(), "none: no credentials") {
		t.Fatalf("Describe = %q", c.Describe())
	}
}

// TestUnparsableFileShowsNoLine: a line the ini parser cannot read (a
// secret without "=") is not quoted in the error Describe shows.
func TestUnparsableFileShowsNoLine(t *testing.T) {
	dir := isolate(t)
	writeFile(t, filepath.Join(dir, "credentials"), "[default]\naws_access_key_id = AK\naws_secret_access_key wJalrSECRETSECRET\n", 0o600)
	_, c := retrieve(t, Options{})
	if d := c.Describe(); strings.Contains(d, "SECRET") || !strings.Contains(d, "not a valid AWS config or credentials file") {
		t.Fatalf("Describe = %q", d)
	}
}
