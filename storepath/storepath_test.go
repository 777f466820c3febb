package storepath

import (
	"errors"
	"testing"
)

func TestCheck(t *testing.T) {
	const h = "r7kyvs66hayj3v09hzgqyrl8f60sll7q"
	good := []string{
		"/nix/store/" + h + "-pbh-test-2",
		"/nix/store/" + h + "-a",
		"/nix/store/" + h + "-x.y_z+1?=2",
		"/nix/store/" + h + "-source-..-x",
	}
	for _, p := range good {
		if err := Check(DefaultStoreDir, p); err != nil {
			t.Errorf("Check(%q) = %v, want nil", p, err)
		}
	}
	bad := []string{
		"",
		"relative/" + h + "-x",
		"/etc/shadow",
		"/nix/store",
		"/nix/store/",
		"/nix/store/" + h,
		"/nix/store/" + h + "-",
		"/nix/store/" + h + "-x/",
		"/nix/store/" + h + "-x/sub",
		"/nix/store/../../etc/shadow",
		"/nix/store/" + h + "-x/../../../etc/shadow",
		"/nix/store/./" + h + "-x",
		"/nix/store//" + h + "-x",
		"/nix/store/" + h + "-..",
		"/nix/store/" + h + "-.hidden",
		"/nix/store/" + h + "-a b",
		"/nix/store/" + h + "-a\x00b",
		"/nix/store/" + h + "-a/b",
		"/nix/store/" + h + "-é",
		"/nix/store/R7kyvs66hayj3v09hzgqyrl8f60sll7q-x", // upper case is not nix32
		"/nix/store/e7kyvs66hayj3v09hzgqyrl8f60sll7q-x", // 'e' is not in nix32
		"/nix/store/r7kyvs66hayj3v09hzgqyrl8f60sll7-x",  // short hash
		"/other/store/" + h + "-x",
		"/nix/store/" + h + "-" + string(make([]byte, 212)),
	}
	for _, p := range bad {
		err := Check(DefaultStoreDir, p)
		if !errors.Is(err, ErrNotStorePath) {
			t.Errorf("Check(%q) = %v, want ErrNotStorePath", p, err)
		}
	}
	if got := HashPart("/nix/store/" + h + "-x"); got != h {
		t.Errorf("HashPart = %q, want %q", got, h)
	}
}

func TestName(t *testing.T) {
	for p, want := range map[string]string{
		"/nix/store/ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-ca-d.drv": "ca-d.drv",
		"ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-x":                   "x",
		"ixp7d7cmnc2agv9bdh63bgb5xrn5mb33-":                    "",
		"short":                                                "",
	} {
		if got := Name(p); got != want {
			t.Errorf("Name(%q) = %q, want %q", p, got, want)
		}
	}
}
