package cachefmt

import "testing"

// TestLayoutKeys: every key is the string stock Nix (or the collector)
// uses, and parsing a built key gives back what built it.
func TestLayoutKeys(t *testing.T) {
	const h = "0c6kzph7l0dcbyhfr6aqqibxb1hn1iz4"
	const drv = "ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv"
	id := "sha256:1mz2zsfm3pqpbjyvfdzq9sjyfr8hkiwkqgfibv2sx1lvjqcz8jvc!out"
	for _, c := range []struct{ got, want string }{
		{Keys.Narinfo(h), h + ".narinfo"},
		{Keys.NarinfoOf("/nix/store/" + h + "-hello-2.12"), h + ".narinfo"},
		{Keys.NarinfoOf(h + "-hello-2.12"), h + ".narinfo"},
		{Keys.NAR("1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3", Extension("xz")), "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz"},
		{Keys.NAR("1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3", Extension("none")), "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar"},
		{Keys.Listing(h), h + ".ls"},
		{Keys.ListingOf("/nix/store/" + h + "-hello-2.12"), h + ".ls"},
		{Keys.Log(drv), "log/" + drv},
		{Keys.Realisation(id), "realisations/" + id + ".doi"},
		{Keys.BuildTrace(drv, "out"), "build-trace-v2/" + drv + "/out.doi"},
		{CacheInfoKey, "nix-cache-info"},
		{GCLeaseKey, "nixspool/gc/lease"},
		{Keys.GCAnnouncement("20260101T000000Z-deadbeef"), "nixspool/gc/doomed/20260101T000000Z-deadbeef.json.zst"},
		{Keys.GCDone("20260101T000000Z-deadbeef"), "nixspool/gc/done/20260101T000000Z-deadbeef"},
		{Keys.Watcher("agent-1"), "nixspool/watchers/agent-1"},
		{Keys.Pin("release-1"), "nixspool/pins/release-1"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}

	if got := Keys.NarinfoHash(Keys.Narinfo(h)); got != h {
		t.Errorf("NarinfoHash round trip: %q", got)
	}
	if got := Keys.ListingHash(Keys.Listing(h)); got != h {
		t.Errorf("ListingHash round trip: %q", got)
	}
	if got, ok := Keys.LogDrv(Keys.Log(drv)); !ok || got != drv {
		t.Errorf("LogDrv round trip: %q %v", got, ok)
	}
	if got, ok := Keys.RealisationID(Keys.Realisation(id)); !ok || got != id {
		t.Errorf("RealisationID round trip: %q %v", got, ok)
	}
	if d, o := Keys.BuildTraceParts(Keys.BuildTrace(drv, "out")); d != drv || o != "out" {
		t.Errorf("BuildTraceParts round trip: %q %q", d, o)
	}
	if c, ann := Keys.GCCycle(Keys.GCAnnouncement("c-1")); c != "c-1" || !ann {
		t.Errorf("GCCycle(announcement) = %q %v", c, ann)
	}
	if c, ann := Keys.GCCycle(Keys.GCDone("c-1")); c != "c-1" || ann {
		t.Errorf("GCCycle(done) = %q %v", c, ann)
	}
	if name, ok := Keys.PinName(Keys.Pin("release-1")); !ok || name != "release-1" {
		t.Errorf("PinName round trip: %q %v", name, ok)
	}

	// Not keys of their kind.
	for _, k := range []string{"x.narinfo", "nar/" + h + ".narinfo", h + "x.narinfo", h + ".narinfo.tmp"} {
		if Keys.NarinfoHash(k) != "" {
			t.Errorf("NarinfoHash(%q) is not empty", k)
		}
	}
	for _, k := range []string{"nixspool/gc/doomed/a b.json.zst", "nixspool/gc/doomed/x", "nixspool/gc/lease"} {
		if c, _ := Keys.GCCycle(k); c != "" {
			t.Errorf("GCCycle(%q) = %q", k, c)
		}
	}
}

// TestLayoutKind classifies keys as the auditor and the collector count
// them.
func TestLayoutKind(t *testing.T) {
	const h = "0c6kzph7l0dcbyhfr6aqqibxb1hn1iz4"
	for k, want := range map[string]Kind{
		h + ".narinfo":                           KindNarinfo,
		"nar/" + h + ".nar.zst":                  KindNAR,
		"nar/" + h + ".narinfo":                  KindNAR,
		h + ".ls":                                KindListing,
		"log/" + h + "-x.drv":                    KindLog,
		"realisations/sha256:ab!out.doi":         KindRealisation,
		"build-trace-v2/" + h + "-x.drv/out.doi": KindRealisation,
		"realisations/sha256:ab!out":             KindOther,
		"nix-cache-info":                         KindCacheInfo,
		"nixspool/gc/lease":                      KindOwn,
		"nixspool/pins/x":                        KindOwn,
		"debuginfo/abc":                          KindOther,
		"x.narinfo":                              KindOther,
	} {
		if got := Keys.Kind(k); got != want {
			t.Errorf("Kind(%q) = %d, want %d", k, got, want)
		}
	}
}
