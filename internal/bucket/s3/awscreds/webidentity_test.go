package awscreds

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"
)

// Web identity against a local STS double (MinIO would need an OpenID
// provider configured at its start): the token file is sent with the
// role, and the region of the STS endpoint is AWS_REGION, else
// AWS_DEFAULT_REGION, else the cache URL's.
func TestWebIdentityRegionOrder(t *testing.T) {
	dir := isolate(t)
	writeFile(t, filepath.Join(dir, "token"), "the-jwt", 0o600)
	t.Setenv("AWS_WEB_IDENTITY_TOKEN_FILE", filepath.Join(dir, "token"))
	t.Setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/ci")
	t.Setenv("AWS_ROLE_SESSION_NAME", "builder-1")
	hosts := make(chan string, 4)
	sts := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		if r.Form.Get("Action") != "AssumeRoleWithWebIdentity" || r.Form.Get("WebIdentityToken") != "the-jwt" ||
			r.Form.Get("RoleArn") != "arn:aws:iam::123456789012:role/ci" || r.Form.Get("RoleSessionName") != "builder-1" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		hosts <- r.Host
		fmt.Fprintf(w, `<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials>
<AccessKeyId>WEBKEY</AccessKeyId><SecretAccessKey>s</SecretAccessKey><SessionToken>t</SessionToken><Expiration>%s</Expiration>
</Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>`, time.Now().Add(time.Hour).UTC().Format(time.RFC3339))
	}))
	defer sts.Close()
	// Every STS host is answered by the double.
	old := httpClient.Transport
	httpClient.Transport = &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // the double's certificate is for 127.0.0.1
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, sts.Listener.Addr().String())
		},
	}
	defer func() { httpClient.Transport = old }()

	for _, c := range []struct{ region, defaultRegion, url, want string }{
		{"eu-west-1", "us-west-2", "ap-south-1", "sts.eu-west-1.amazonaws.com"},
		{"", "us-west-2", "ap-south-1", "sts.us-west-2.amazonaws.com"},
		{"", "", "ap-south-1", "sts.ap-south-1.amazonaws.com"},
	} {
		t.Setenv("AWS_REGION", c.region)
		t.Setenv("AWS_DEFAULT_REGION", c.defaultRegion)
		w := &WebIdentity{URLRegion: c.url}
		v, err := w.RetrieveWithCredContext(nil)
		if err != nil || v.AccessKeyID != "WEBKEY" {
			t.Fatalf("%+v: %q, %v", c, v.AccessKeyID, err)
		}
		if h := <-hosts; h != c.want {
			t.Errorf("%+v: STS asked at %s, want %s", c, h, c.want)
		}
	}
}
