package cacheurl

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	c, err := Parse("s3://nix-cache?endpoint=127.0.0.1:9000&region=eu-west-1&scheme=http&profile=ci&compression=xz&write-nar-listing=1&narinfo-compression=br&priority=30&want-mass-query=false&addressing-style=path")
	if err != nil {
		t.Fatal(err)
	}
	if c.Bucket != "nix-cache" || c.Endpoint != "127.0.0.1:9000" || c.Region != "eu-west-1" || c.Secure || c.Profile != "ci" ||
		c.Compression != "xz" || !c.WriteNARListing || c.NarinfoCompression != "br" || c.Priority != 30 || c.WantMassQuery || c.PathStyle != "path" {
		t.Fatalf("parsed %+v", c)
	}
	d, err := Parse("s3://b")
	if err != nil || !d.Secure || d.Compression != "zstd" || d.Priority != 40 || !d.WantMassQuery {
		t.Fatalf("defaults: %+v %v", d, err)
	}
	f, err := Parse("file:///var/cache/nix?compression=none")
	if err != nil || f.Dir != "/var/cache/nix" || f.Compression != "none" {
		t.Fatalf("file: %+v %v", f, err)
	}
	if c.Identity() == d.Identity() {
		t.Fatal("different endpoints share an identity")
	}
}

func TestParseErrorsNameTheParameter(t *testing.T) {
	for raw, want := range map[string]string{
		"s3://b?compresion=zstd":         "compresion",
		"s3://b?compression=lz4":         "compression",
		"s3://b?scheme=ftp":              "scheme",
		"s3://b?narinfo-compression=xz":  "narinfo-compression",
		"s3://b?priority=-1":             "priority",
		"s3://b?compression-level=99":    "compression-level",
		"file:///d?endpoint=x":           "endpoint",
		"s3://b?region=a&region=b":       "region",
		"s3://b?write-nar-listing=maybe": "write-nar-listing",
		"http://example.com/cache":       "scheme",
		"file://relative/dir":            "absolute",
		"s3://?endpoint=x":               "bucket",
		"s3://key:secret@bucket":         "credentials",
		"file:///a/../b":                 "clean",
	} {
		_, err := Parse(raw)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an error mentioning %q", raw, err, want)
		}
	}
}

func TestStringHasNoSecrets(t *testing.T) {
	c, _ := Parse("s3://b/pre?endpoint=h:1&scheme=http")
	if got := c.String(); got != "s3://b/pre?endpoint=h%3A1&region=us-east-1&scheme=http" {
		t.Fatalf("String = %q", got)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"s3://b?endpoint=h:1&scheme=http", "file:///x", "s3://b/p?compression=xz&priority=1", "%zz", "s3://b?a=b&a=c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		c, err := Parse(raw)
		if err != nil {
			return
		}
		if c.Scheme != "s3" && c.Scheme != "file" {
			t.Fatalf("accepted scheme %q", c.Scheme)
		}
		_ = c.String()
		_ = c.Identity()
	})
}
