package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
	"github.com/nixspool/nixspool/storepath"
)

// The tests in this file run nixspool against a second S3 implementation,
// the Versity S3 Gateway, which shares no code with MinIO: the behaviour
// nixspool relies on (conditional writes, listings, multipart uploads and
// their part ETags, Content-Encoding, error codes, anonymous reads) is
// checked on two independent servers.

// TestSingleUserToAltS3: nix-build with the hook, agentd uploading to
// versitygw with compressed narinfos and listings and the build logs, and
// stock Nix verifying and substituting the closure over anonymous HTTP and
// reading a build log back.
func TestSingleUserToAltS3(t *testing.T) {
	testenv.RequireNix(t)
	s := testenv.StartVersityGW(t)
	singleUserTo(t, s, "narinfo-compression=br&write-nar-listing=1&ls-compression=gzip&log-compression=br")
}

// TestCompressedMetadataToMinIO is the same scenario against MinIO, so the
// compressed metadata and build logs are read by stock Nix from both.
func TestCompressedMetadataToMinIO(t *testing.T) {
	testenv.RequireNix(t)
	singleUserTo(t, testenv.StartMinIO(t), "narinfo-compression=br&write-nar-listing=1&ls-compression=gzip&log-compression=br")
}

// singleUserTo builds a graph of paths (two with 1 MiB of random bytes,
// which are sent as single PUTs larger than the small-object limit) with
// the hook configured, waits for agentd to upload them to s and checks the
// cache with stock Nix. params are extra cache URL parameters.
func singleUserTo(t *testing.T, s testenv.S3Server, params string) {
	t.Helper()
	sk, pk := keyPair(t, "e2e-"+s.Kind()+"-1")
	a := newAgent(t, s.CacheURL(params), sk, s.Env(), "--upload-build-logs")
	a.Start()

	g := testenv.WriteGraph(t, t.TempDir(), true)
	env := testenv.NixEnv(hookConfig(), a.HookEnv()...)
	top := build(t, env, g)

	st := a.WaitDrained(2 * time.Minute)
	if st.Failed != 0 || st.Uploaded != testenv.GraphPaths {
		t.Fatalf("status = %+v, want %d uploaded and none failed", st, testenv.GraphPaths)
	}
	keys := strings.Join(s.Keys(t), "\n")
	for _, want := range []string{"nix-cache-info", ".nar.zst", storepath.HashPart(top) + ".narinfo", "log/"} {
		if !strings.Contains(keys, want) {
			t.Errorf("bucket lacks %s:\n%s", want, keys)
		}
	}
	verifyCache(t, s.HTTPURL(), pk, top)

	// A key the cache was not signed with must fail the same check.
	_, otherPK := keyPair(t, "e2e-other-1")
	out, err := testenv.Output(testenv.NixEnv(""), "nix", "store", "verify", "--store", s.HTTPURL(), "--trusted-public-keys", otherPK, "-r", top)
	if err == nil || !strings.Contains(out, "untrusted") {
		t.Fatalf("verify with an unknown key passed (err=%v):\n%s", err, out)
	}
	// Stock Nix reads the (compressed) build log back over HTTP.
	drv := strings.TrimSpace(testenv.Run(t, testenv.NixEnv(""), "nix-store", "-q", "--deriver", top))
	if out := testenv.Run(t, testenv.NixEnv(""), "nix-store", "--store", s.HTTPURL(), "--read-log", drv); !strings.Contains(out, "building top") {
		t.Fatalf("build log read from the cache: %q", out)
	}
}

// TestResumeLargeUploadAltS3: a large NAR's multipart upload to versitygw,
// interrupted by SIGKILL after some parts, resumes after the restart from
// the parts the server lists (their ETags are the MD5 of their bytes)
// instead of starting over.
func TestResumeLargeUploadAltS3(t *testing.T) {
	testenv.RequireNix(t)
	resumeLargeUploadTo(t, testenv.StartVersityGW(t))
}

func resumeLargeUploadTo(t *testing.T, s testenv.S3Server) {
	t.Helper()
	p := testenv.StartFaultProxy(t, s.Addr())
	slow := p.DelayWhile(300*time.Millisecond, testenv.IsPart)
	sk, pk := keyPair(t, "e2e-resume-"+s.Kind()+"-1")
	a := newAgent(t, s.CacheURLVia(p), sk, s.Env())
	a.Start()

	// 80 MiB of random bytes: zstd cannot shrink it, so 5 parts of 16 MiB.
	const size = 80 << 20
	path := testenv.AddRandomPath(t, "big", size)
	if out, err := a.Ctl("push", path); err != nil {
		t.Fatalf("push: %v\n%s", err, out)
	}
	testenv.Poll(t, time.Minute, "two parts to be uploaded", func() bool { return p.PartsDone.Load() >= 2 })
	a.Kill()
	testenv.Poll(t, 30*time.Second, "the killed agent's requests to end", func() bool { return p.InFlight.Load() == 0 })
	before := p.PutBytes.Load()
	slow.Store(false)
	a.Start()
	st := a.WaitDrained(2 * time.Minute)
	if st.Uploaded != 1 || st.Failed != 0 {
		t.Fatalf("after restart: %+v", st)
	}
	after := p.PutBytes.Load() - before
	if after >= size {
		t.Fatalf("sent %d bytes after the restart, not less than the %d-byte object: the upload started over", after, size)
	}
	if !strings.Contains(a.log.String(), "resumed upload completed") {
		t.Errorf("no resume logged:\n%s", a.log.String())
	}
	verifyCache(t, s.HTTPURL(), pk, path)
	t.Logf("resume on %s: %d bytes of PUT requests before SIGKILL, %d after the restart (object %d bytes)", s.Kind(), before, after, size)
}

// TestWrongCredentialsAltS3: versitygw answers an unknown access key and a
// wrong secret with its own codes; either way a queued path must fail
// (not retry for ever) with a reason that points at the credentials,
// doctor must fail the same way, and the secret must not be printed.
func TestWrongCredentialsAltS3(t *testing.T) {
	testenv.RequireNix(t)
	s := testenv.StartVersityGW(t)
	access, _ := s.Credentials()
	sk, _ := keyPair(t, "e2e-badcreds-1")
	for _, creds := range [][2]string{{access, "wrong-secret-1"}, {"unknown-access", "wrong-secret-2"}} {
		a := newAgent(t, s.CacheURL(""), sk, []string{"AWS_ACCESS_KEY_ID=" + creds[0], "AWS_SECRET_ACCESS_KEY=" + creds[1]})
		a.SkipAudit = true // the audit would use the same wrong credentials
		a.Start()
		p := testenv.AddTextPath(t, "badcreds", "nothing to see\n")
		if out, err := a.Ctl("push", p); err != nil {
			t.Fatalf("push: %v\n%s", err, out)
		}
		testenv.Poll(t, time.Minute, "the job to fail", func() bool { return a.Status().Failed == 1 })
		out, err := a.Ctl("list", "--state", "failed", "--json")
		if err != nil || !strings.Contains(out, "check the credentials") && !strings.Contains(out, "check the secret key") {
			t.Fatalf("failed job with %s's wrong credentials does not point at them (%v):\n%s", creds[0], err, out)
		}
		doc, err := a.Ctl("doctor")
		if err == nil || !strings.Contains(doc, "FAIL") || !strings.Contains(doc, "check the credentials") {
			t.Fatalf("doctor with wrong credentials: %v\n%s", err, doc)
		}
		if strings.Contains(out+doc+a.log.String(), creds[1]) {
			t.Fatalf("the secret was printed:\n%s\n%s\n%s", out, doc, a.log.String())
		}
		a.Stop()
	}
	if keys := s.Keys(t); len(keys) != 0 {
		t.Fatalf("objects written with wrong credentials: %v", keys)
	}
}
