package realisation

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/nixspool/nixspool/internal/nixstore"
	"github.com/nixspool/nixspool/internal/uploader"
)

// A floating CA derivation b, d depending on b, and d resolved, with the
// realisations Nix 2.8 registered for them (generated; see drvhash).
const (
	bPath        = "/nix/store/scqqla1vibi73xi7h3is2hzqh9djpk7a-ca-b.drv"
	dPath        = "/nix/store/750ak6smnj2qfj1l52pn2x1yqac3p60a-ca-d.drv"
	dResPath     = "/nix/store/ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv"
	bDrv         = `Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","echo b-exp920810966 > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","ca-b"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
	dDrv         = `Derive([("out","","r:sha256","")],[("/nix/store/scqqla1vibi73xi7h3is2hzqh9djpk7a-ca-b.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo /0zf31fpnxhajsk7p962l69a7crhf56rlnma9kmjk342m1cmm0q4d > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","ca-d"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
	dResDrv      = `Derive([("out","","r:sha256","")],[],["/nix/store/8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b"],"x86_64-linux","/bin/sh",["-c","echo /nix/store/8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b > $out"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","ca-d"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])`
	plainDrv     = `Derive([("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain","","")],[],[],"x86_64-linux","/bin/sh",[],[("name","plain"),("out","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain")])`
	plainDrvPath = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-plain.drv"

	bID    = "sha256:17ad9e960d8929616deb698aeba7d041e566bfc033956b7fcb6b1f3db352875e!out"
	dID    = "sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out"
	dResID = "sha256:dac46ccad62f5e1504df177cfcd3c6f1d6f7c76f3c78e493f8fb0a5982d34c96!out"
	bOut   = "8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b"
	dOut   = "y00dvb16sdgib2sg17lkrizfaf9cvl6m-ca-d"
)

// What `nix copy` of d wrote for d's realisation with Nix 2.8 (generated).
const nixDocD = `{"dependentRealisations":{"sha256:17ad9e960d8929616deb698aeba7d041e566bfc033956b7fcb6b1f3db352875e!out":"8nx8digca9nbzx4bmq7hywdwl2yaqshm-ca-b"},"id":"sha256:8f6d0cec4ed6873a0574010b5b68e03f37deccde3ba8777dab5c0085b244fd65!out","outPath":"y00dvb16sdgib2sg17lkrizfaf9cvl6m-ca-d","signatures":[]}`

func TestDocumentMatchesNix(t *testing.T) {
	r, err := nixstore.ParseRealisation([]byte(nixDocD))
	if err != nil {
		t.Fatal(err)
	}
	if got := string(Document(r)); got != nixDocD {
		t.Fatalf("Document:\n%s\nNix wrote:\n%s", got, nixDocD)
	}
	if got, want := string(Fingerprint(r)), strings.Replace(nixDocD, `,"signatures":[]`, "", 1); got != want {
		t.Fatalf("Fingerprint = %s, want %s", got, want)
	}
	if Key(r.ID) != "realisations/"+dID+".doi" {
		t.Fatalf("Key = %s", Key(r.ID))
	}
}

func TestSignKeepsOtherKeys(t *testing.T) {
	sk, pk, _ := signature.GenerateKeypair("ours-1", rand.Reader)
	other, otherPK, _ := signature.GenerateKeypair("builder-1", rand.Reader)
	r, _ := nixstore.ParseRealisation([]byte(nixDocD))
	theirs, _ := other.Sign(nil, string(Fingerprint(r)))
	stale, _ := sk.Sign(nil, "something else")
	r.Signatures = []string{theirs.String(), stale.String()}
	if err := Sign(r, []signature.SecretKey{sk}); err != nil {
		t.Fatal(err)
	}
	if len(r.Signatures) != 2 {
		t.Fatalf("signatures = %v, want ours (replacing the stale one) and builder-1's", r.Signatures)
	}
	fp := string(Fingerprint(r))
	for _, s := range r.Signatures {
		sig, err := signature.ParseSignature(s)
		if err != nil {
			t.Fatal(err)
		}
		if !signature.VerifyFirst(fp, []signature.Signature{sig}, []signature.PublicKey{pk, otherPK}) {
			t.Errorf("signature %s does not verify", s)
		}
	}
	var doc map[string]any
	if err := json.Unmarshal(Document(r), &doc); err != nil || len(doc["signatures"].([]any)) != 2 {
		t.Fatalf("document %s: %v", Document(r), err)
	}
}

func TestBuildTraceFormat(t *testing.T) {
	sk, pk, _ := signature.GenerateKeypair("ours-1", rand.Reader)
	body, err := BuildTraceDocument("ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv", "out", dOut, []signature.SecretKey{sk}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		OutPath    string `json:"outPath"`
		Signatures []struct {
			KeyName string `json:"keyName"`
			Sig     string `json:"sig"`
		} `json:"signatures"`
	}
	if err := json.Unmarshal(body, &doc); err != nil || doc.OutPath != dOut || len(doc.Signatures) != 1 || doc.Signatures[0].KeyName != "ours-1" {
		t.Fatalf("body %s: %v", body, err)
	}
	fp := `{"key":{"drvPath":"ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv","outputName":"out"},"value":{"outPath":"` + dOut + `"}}`
	if got := string(BuildTraceFingerprint("ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv", "out", dOut)); got != fp {
		t.Fatalf("fingerprint %s, want %s", got, fp)
	}
	data, _ := base64.StdEncoding.DecodeString(doc.Signatures[0].Sig)
	if !pk.Verify(fp, signature.Signature{Name: "ours-1", Data: data}) {
		t.Fatal("build trace signature does not verify")
	}
	if k := BuildTraceKey("ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv", "out"); k != "build-trace-v2/ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv/out.doi" {
		t.Fatalf("key %s", k)
	}
}

func TestJSONEscapes(t *testing.T) {
	r := &nixstore.Realisation{ID: dID, OutPath: "a\"b\\c\n\x01é", DependentRealisations: map[string]string{}}
	got := string(Document(r))
	if !strings.Contains(got, `"outPath":"a\"b\\c\n\u0001é"`) {
		t.Fatalf("%s", got)
	}
	var back map[string]any
	if err := json.Unmarshal([]byte(got), &back); err != nil || back["outPath"] != r.OutPath {
		t.Fatalf("round trip: %v %v", back, err)
	}
}

// fakeStore is a Nix daemon with the realisations above.
type fakeStore struct {
	outputs      map[string]map[string]string
	realisations map[string]*nixstore.Realisation
	infos        map[string]*nixstore.PathInfo
	referrers    map[string][]string
	// byPath: a Nix 2.35 daemon, which answers by derivation path only
	// (traces, keyed "drv^output").
	byPath     bool
	traces     map[string]*nixstore.BuildTraceEntry
	queries    int
	referrerQs int
	realErr    error
}

func (f *fakeStore) QueryDerivationOutputMap(_ context.Context, drv string) (map[string]string, error) {
	f.queries++
	if m, ok := f.outputs[drv]; ok {
		return m, nil
	}
	return nil, &nixstore.DaemonError{Msg: "path '" + drv + "' is not valid"}
}

func (f *fakeStore) QueryRealisation(_ context.Context, id string) (*nixstore.Realisation, error) {
	f.queries++
	if f.realErr != nil {
		return nil, f.realErr
	}
	if f.byPath {
		return nil, fmt.Errorf("query realisation %s: %w", id, nixstore.ErrKeyedByPath)
	}
	r := f.realisations[id]
	if r == nil {
		return nil, nil
	}
	c := *r
	return &c, nil
}

func (f *fakeStore) QueryPathInfo(_ context.Context, p string) (*nixstore.PathInfo, error) {
	f.queries++
	return f.infos[p], nil
}

func (f *fakeStore) QueryBuildTrace(_ context.Context, drv, output string) (*nixstore.BuildTraceEntry, error) {
	f.queries++
	if !f.byPath {
		return nil, fmt.Errorf("query build trace: %w", nixstore.ErrRealisationsUnsupported)
	}
	return f.traces[drv+"^"+output], nil
}

func (f *fakeStore) QueryReferrers(_ context.Context, p string) ([]string, error) {
	f.queries++
	f.referrerQs++
	return f.referrers[p], nil
}

func newFixture() (*Realiser, *fakeStore, signature.PublicKey) {
	files := map[string]string{bPath: bDrv, dPath: dDrv, dResPath: dResDrv, plainDrvPath: plainDrv}
	st := &fakeStore{
		outputs: map[string]map[string]string{
			bPath:    {"out": "/nix/store/" + bOut},
			dPath:    {"out": "/nix/store/" + dOut},
			dResPath: {"out": "/nix/store/" + dOut},
		},
		realisations: map[string]*nixstore.Realisation{
			bID:    {ID: bID, OutPath: bOut, DependentRealisations: map[string]string{}},
			dID:    {ID: dID, OutPath: dOut, DependentRealisations: map[string]string{bID: bOut}},
			dResID: {ID: dResID, OutPath: dOut, DependentRealisations: map[string]string{}},
		},
		infos: map[string]*nixstore.PathInfo{
			"/nix/store/" + bOut: {Path: "/nix/store/" + bOut, Deriver: bPath},
		},
		// d refers to its input derivation b (and the resolved d to b's
		// output, with the store's other referrers of b).
		referrers: map[string][]string{
			bPath:                {plainDrvPath, dPath, "/nix/store/cccccccccccccccccccccccccccccccc-ca-d-2.drv"},
			"/nix/store/" + bOut: {dResPath},
		},
	}
	sk, pk, _ := signature.GenerateKeypair("ours-1", rand.Reader)
	r := New(Options{Store: st, Keys: []signature.SecretKey{sk}, ReadDrv: func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, os.ErrNotExist
	}})
	return r, st, pk
}

func keys(extras []uploader.Extra) []string {
	var out []string
	for _, e := range extras {
		out = append(out, e.Key)
	}
	return out
}

// TestResolvedBuild: d's output has the resolved derivation as deriver;
// the hook named d. Both realisations go out, b's (which d's depends on)
// first, and the resolved one also in the 2.35 layout.
func TestResolvedBuild(t *testing.T) {
	r, _, pk := newFixture()
	r.Note(dPath, "/nix/store/"+dOut)
	info := &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath, References: []string{"/nix/store/" + bOut}}
	extras, err := r.For(context.Background(), info)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{Key(bID), Key(dID), Key(dResID), BuildTraceKey("ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv", "out")}
	if strings.Join(keys(extras), " ") != strings.Join(want, " ") {
		t.Fatalf("keys = %v\nwant  %v", keys(extras), want)
	}
	for _, e := range extras[:3] {
		got, err := nixstore.ParseRealisation(e.Body)
		if err != nil || e.ContentType != "application/json" {
			t.Fatalf("%s: %v", e.Key, err)
		}
		sig, _ := signature.ParseSignature(got.Signatures[0])
		if len(got.Signatures) != 1 || !pk.Verify(string(Fingerprint(got)), sig) {
			t.Errorf("%s: signatures %v do not verify", e.Key, got.Signatures)
		}
	}
	if d, _ := nixstore.ParseRealisation(extras[1].Body); d.DependentRealisations[bID] != bOut {
		t.Errorf("d's realisation lost its dependency: %s", extras[1].Body)
	}
}

// TestUnresolvedBuild: b (no inputs) is its own deriver; no note needed.
func TestUnresolvedBuild(t *testing.T) {
	r, _, _ := newFixture()
	extras, err := r.For(context.Background(), &nixstore.PathInfo{Path: "/nix/store/" + bOut, Deriver: bPath})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys(extras), " "); got != Key(bID)+" "+BuildTraceKey("scqqla1vibi73xi7h3is2hzqh9djpk7a-ca-b.drv", "out") {
		t.Fatalf("keys = %s", got)
	}
}

// TestStaticDerivationsCostNothing: input-addressed paths, paths without
// a deriver and derivers missing from the store need no daemon query.
func TestStaticDerivationsCostNothing(t *testing.T) {
	r, st, _ := newFixture()
	for _, info := range []*nixstore.PathInfo{
		{Path: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain", Deriver: plainDrvPath},
		{Path: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain", Deriver: plainDrvPath},
		{Path: "/nix/store/cccccccccccccccccccccccccccccccc-added"},
		{Path: "/nix/store/dddddddddddddddddddddddddddddddd-subst", Deriver: "/nix/store/dddddddddddddddddddddddddddddddd-gone.drv"},
		{Path: "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-evil", Deriver: "/etc/passwd"},
	} {
		extras, err := r.For(context.Background(), info)
		if err != nil || len(extras) != 0 {
			t.Errorf("%s: %v, %v", info.Path, keys(extras), err)
		}
	}
	if st.queries != 0 {
		t.Fatalf("%d daemon queries for paths that need none", st.queries)
	}
}

// TestDependencyNotAReference: a dependency whose output is not a
// reference of the dependent output could be written before its narinfo;
// the realisation is left out instead.
func TestDependencyNotAReference(t *testing.T) {
	r, _, _ := newFixture()
	r.Note(dPath, "/nix/store/"+dOut)
	extras, err := r.For(context.Background(), &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys(extras) {
		if k == Key(dID) || k == Key(bID) {
			t.Fatalf("wrote %s although b's output is not a reference: %v", k, keys(extras))
		}
	}
	if len(extras) != 2 {
		t.Fatalf("keys = %v, want the resolved realisation in both layouts", keys(extras))
	}
}

// TestDaemonWithoutRealisations: a daemon that refuses realisation
// queries (ca-derivations off, or a newer protocol) costs one query,
// is not an upload error, and is not asked again for a while.
func TestDaemonWithoutRealisations(t *testing.T) {
	r, st, _ := newFixture()
	st.realErr = fmt.Errorf("query: %w", nixstore.ErrRealisationsUnsupported)
	info := &nixstore.PathInfo{Path: "/nix/store/" + bOut, Deriver: bPath}
	for i := 0; i < 3; i++ {
		if extras, err := r.For(context.Background(), info); err != nil || len(extras) != 0 {
			t.Fatalf("For = %v, %v", keys(extras), err)
		}
	}
	if st.queries != 2 { // one output map, one realisation query
		t.Fatalf("%d queries, want 2", st.queries)
	}
}

// TestDaemonErrorsAreTransient: a broken connection is an error (the
// upload is retried), not a silently missing realisation.
func TestDaemonErrorsAreTransient(t *testing.T) {
	r, st, _ := newFixture()
	st.realErr = errors.New("connection reset")
	if _, err := r.For(context.Background(), &nixstore.PathInfo{Path: "/nix/store/" + bOut, Deriver: bPath}); err == nil {
		t.Fatal("no error")
	}
}

// TestNotes: Forget returns what was noted meanwhile.
func TestNotes(t *testing.T) {
	r, _, _ := newFixture()
	r.Note(dPath, "/p1", "/p2")
	r.Note("/etc/passwd", "/p1")
	if got := r.Noted("/p1"); len(got) != 1 || got[0] != dPath {
		t.Fatalf("Noted = %v", got)
	}
	snap := r.Noted("/p1")
	r.Note(dResPath, "/p1")
	if since := r.Forget("/p1", snap); len(since) != 1 || since[0] != dResPath {
		t.Fatalf("Forget = %v", since)
	}
	if since := r.Forget("/p1", []string{dResPath}); len(since) != 0 || len(r.Noted("/p1")) != 0 {
		t.Fatalf("notes left: %v", since)
	}
	if len(r.Noted("/p2")) != 1 {
		t.Fatal("note of another path lost")
	}
}

// BenchmarkForInputAddressed is the cost For adds to every uploaded path
// of an ordinary (input-addressed) build: one look at a remembered verdict.
func BenchmarkForInputAddressed(b *testing.B) {
	r, st, _ := newFixture()
	info := &nixstore.PathInfo{Path: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-plain", Deriver: plainDrvPath}
	ctx := context.Background()
	for b.Loop() {
		if _, err := r.For(ctx, info); err != nil {
			b.Fatal(err)
		}
	}
	if st.queries != 0 {
		b.Fatal("daemon queried")
	}
}

// BenchmarkForResolvedBuild: a CA output with its resolved and unresolved
// derivations and one dependency (fake daemon: no round trips counted).
func BenchmarkForResolvedBuild(b *testing.B) {
	r, _, _ := newFixture()
	info := &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath, References: []string{"/nix/store/" + bOut}}
	r.Note(dPath, info.Path)
	ctx := context.Background()
	for b.Loop() {
		if extras, err := r.For(ctx, info); err != nil || len(extras) != 4 {
			b.Fatal(len(extras), err)
		}
	}
}

// TestNotesAreBounded: past maxNotes outputs waiting, a note is dropped,
// and that is said once, not silently and not per note.
func TestNotesAreBounded(t *testing.T) {
	var logs strings.Builder
	r := New(Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	for i := 0; i < maxNotes+10; i++ {
		r.Note(dPath, fmt.Sprintf("/nix/store/%032d-out", i))
	}
	if n := len(r.notes); n != maxNotes {
		t.Fatalf("%d notes kept, want %d", n, maxNotes)
	}
	if got := r.Noted(fmt.Sprintf("/nix/store/%032d-out", maxNotes+5)); len(got) != 0 {
		t.Fatalf("a note past the bound was kept: %v", got)
	}
	if c := strings.Count(logs.String(), "too many build outputs"); c != 1 {
		t.Fatalf("warned %d times, want once:\n%s", c, logs.String())
	}
}

// TestResolvedBuildHookNamesResolved: Nix 2.33 and later name only the
// resolved derivation in the hook (the output's deriver too). The
// unresolved d, which clients evaluate, is found among the referrers of
// the deriver of the resolved derivation's input b, and its realisation
// goes out after b's. (A fake store: no Nix 2.33 installs here; the
// referrer search runs against a real Nix 2.8 daemon in e2e.)
func TestResolvedBuildHookNamesResolved(t *testing.T) {
	r, st, _ := newFixture()
	r.Note(dResPath, "/nix/store/"+dOut)
	info := &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath, References: []string{"/nix/store/" + bOut}}
	extras, err := r.For(context.Background(), info)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(keys(extras), " ")
	want := Key(dResID) + " " + BuildTraceKey("ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv", "out") + " " + Key(bID) + " " + Key(dID)
	if got != want {
		t.Fatalf("keys = %s\nwant   %s", got, want)
	}
	if st.referrerQs != 2 {
		t.Errorf("%d referrer queries, want 2 (b's output, then its deriver)", st.referrerQs)
	}
}

// TestSearchIsSound: a derivation of the same name among the referrers
// whose output map (its realisation in the store) names another path is
// not published as this output's.
func TestSearchIsSound(t *testing.T) {
	r, st, _ := newFixture()
	st.outputs[dPath] = map[string]string{"out": "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-ca-d"}
	info := &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath, References: []string{"/nix/store/" + bOut}}
	extras, err := r.For(context.Background(), info)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys(extras), " "); got != Key(dResID)+" "+BuildTraceKey("ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv", "out") {
		t.Fatalf("keys = %s", got)
	}
}

// TestNoSearchWhenTheHookNamesUnresolved: Nix ≤ 2.32 names the unresolved
// derivation; nothing is searched then.
func TestNoSearchWhenTheHookNamesUnresolved(t *testing.T) {
	r, st, _ := newFixture()
	r.Note(dPath, "/nix/store/"+dOut)
	info := &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath, References: []string{"/nix/store/" + bOut}}
	if _, err := r.For(context.Background(), info); err != nil {
		t.Fatal(err)
	}
	if st.referrerQs != 0 {
		t.Fatalf("%d referrer queries", st.referrerQs)
	}
}

// TestNewerDaemonBuildTrace: a Nix 2.35 daemon (a fake here; no such Nix
// installs on these machines, and nixstore's tests check the wire format
// against a double of it) answers by derivation path. The build trace
// entry is written with ours and the daemon's other signatures (they sign
// the entry's fingerprint); the hash-keyed realisation of the resolved
// derivation with ours only; nothing is searched.
func TestNewerDaemonBuildTrace(t *testing.T) {
	r, st, pk := newFixture()
	other, otherPK, _ := signature.GenerateKeypair("builder-1", rand.Reader)
	dResBase := "ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv"
	theirs, _ := other.Sign(nil, string(BuildTraceFingerprint(dResBase, "out", dOut)))
	st.byPath = true
	st.traces = map[string]*nixstore.BuildTraceEntry{dResPath + "^out": {OutPath: dOut, Signatures: []string{theirs.String()}}}
	r.Note(dResPath, "/nix/store/"+dOut)
	info := &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dResPath, References: []string{"/nix/store/" + bOut}}
	extras, err := r.For(context.Background(), info)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys(extras), " "); got != Key(dResID)+" "+BuildTraceKey(dResBase, "out") {
		t.Fatalf("keys = %s", got)
	}
	legacy, err := nixstore.ParseRealisation(extras[0].Body)
	if err != nil || len(legacy.Signatures) != 1 || len(legacy.DependentRealisations) != 0 {
		t.Fatalf("legacy document %s: %v", extras[0].Body, err)
	}
	var doc struct {
		OutPath    string `json:"outPath"`
		Signatures []struct{ KeyName, Sig string }
	}
	if err := json.Unmarshal(extras[1].Body, &doc); err != nil || len(doc.Signatures) != 2 || doc.Signatures[0].KeyName != "builder-1" {
		t.Fatalf("build trace %s: %v", extras[1].Body, err)
	}
	fp := string(BuildTraceFingerprint(dResBase, "out", dOut))
	for _, s := range doc.Signatures {
		data, _ := base64.StdEncoding.DecodeString(s.Sig)
		if !signature.VerifyFirst(fp, []signature.Signature{{Name: s.KeyName, Data: data}}, []signature.PublicKey{pk, otherPK}) {
			t.Errorf("signature of %s does not verify", s.KeyName)
		}
	}
	if st.referrerQs != 0 {
		t.Errorf("%d referrer queries", st.referrerQs)
	}
	// The unresolved d has no entry on such a daemon: nothing for it.
	r.Forget(info.Path, []string{dResPath})
	if extras, err := r.For(context.Background(), &nixstore.PathInfo{Path: "/nix/store/" + dOut, Deriver: dPath, References: info.References}); err != nil || len(extras) != 0 {
		t.Fatalf("unresolved: %v, %v", keys(extras), err)
	}
}
