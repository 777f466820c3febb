// Package docs holds nixspool's documentation pages; its test checks that
// what the code and the pages cite exists.
package docs

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode"
)

// root is the repository, seen from this package's directory.
const root = ".."

// skipDirs are not scanned: tool binaries, build output, make run's state.
var skipDirs = map[string]bool{".git": true, ".tools": true, "bin": true, "var": true, "vendor": true, "node_modules": true}

var (
	// docs/<name>.md, optionally followed by a section: a comma and the
	// heading in double quotes (escaped in a Go string, or on the next line
	// of a comment), or #anchor.
	docsRef = regexp.MustCompile(`\bdocs/([A-Za-z0-9_-]+\.md)(?:#([A-Za-z0-9_-]+)|,\s*(?:(?://|#)\s*)?\\?"([^"\\\n]+)\\?")?`)
	// A section of the README: README.md followed by a comma and the quoted
	// heading, or by #anchor; or the README's <Heading> section.
	readmeRef = regexp.MustCompile(`\bREADME(?:\.md)?(?:#([A-Za-z0-9_-]+)|,\s*(?:(?://|#)\s*)?\\?"([^"\\\n]+)\\?"|'s ([A-Z][A-Za-z0-9 ,()-]*?) section)`)
	// [text](target) in markdown.
	mdLink  = regexp.MustCompile(`\[[^\]\n]*\]\(([^)\s]+)\)`)
	heading = regexp.MustCompile(`^(#{1,6}) +(.*?)\s*#*\s*$`)
)

// TestReferencesResolve: every docs/<name>.md a .go, .nix, Makefile or .md
// file names exists, with the section it names; every README section cited
// exists; and every relative link in a markdown file reaches a file (and,
// with #anchor, a heading of it).
func TestReferencesResolve(t *testing.T) {
	files := scan(t)
	if len(files) < 10 {
		t.Fatalf("scanned only %d files: is %s the repository?", len(files), root)
	}
	headings := map[string]*page{} // by path relative to root
	pageAt := func(rel string) (*page, error) {
		if p, ok := headings[rel]; ok {
			return p, nil
		}
		data, err := os.ReadFile(filepath.Join(root, rel))
		if err != nil {
			return nil, err
		}
		p := parsePage(string(data))
		headings[rel] = p
		return p, nil
	}
	reported := map[string]bool{} // a markdown link is also a docs/ citation: report it once
	report := func(format string, args ...any) {
		if msg := fmt.Sprintf(format, args...); !reported[msg] {
			reported[msg] = true
			t.Error(msg)
		}
	}
	checkSection := func(where, rel, anchor, title string) {
		p, err := pageAt(rel)
		if err != nil {
			report("%s: cites %s, which does not exist", where, rel)
			return
		}
		if anchor != "" && !p.anchors[anchor] {
			report("%s: cites %s#%s, which has no such heading", where, rel, anchor)
		}
		if title != "" && !p.titles[title] {
			report("%s: cites %s, %q, which has no such heading", where, rel, title)
		}
	}

	cited, linked := 0, 0
	defer func() { t.Logf("%d files: %d citations, %d links checked", len(files), cited, linked) }()
	for _, rel := range files {
		data, err := os.ReadFile(filepath.Join(root, rel))
		if err != nil {
			t.Fatal(err)
		}
		text := string(data)
		for _, m := range docsRef.FindAllStringSubmatchIndex(text, -1) {
			where := fmt.Sprintf("%s:%d", rel, lineOf(text, m[0]))
			checkSection(where, "docs/"+text[m[2]:m[3]], group(text, m, 2), group(text, m, 3))
			cited++
		}
		for _, m := range readmeRef.FindAllStringSubmatchIndex(text, -1) {
			where := fmt.Sprintf("%s:%d", rel, lineOf(text, m[0]))
			title := group(text, m, 2)
			if title == "" {
				title = group(text, m, 3)
			}
			checkSection(where, "README.md", group(text, m, 1), title)
			cited++
		}
		if !strings.HasSuffix(rel, ".md") {
			continue
		}
		body := withoutCode(text)
		for _, m := range mdLink.FindAllStringSubmatchIndex(body, -1) {
			target := body[m[2]:m[3]]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			where := fmt.Sprintf("%s:%d", rel, lineOf(body, m[0]))
			linked++
			file, anchor, _ := strings.Cut(target, "#")
			dest := rel
			if file != "" {
				dest = filepath.ToSlash(filepath.Clean(filepath.Join(filepath.Dir(rel), file)))
				if _, err := os.Stat(filepath.Join(root, dest)); err != nil {
					report("%s: link to %s: %s does not exist", where, target, dest)
					continue
				}
			}
			if anchor == "" {
				continue
			}
			if !strings.HasSuffix(dest, ".md") {
				report("%s: link to %s: an anchor into a file that is not markdown", where, target)
				continue
			}
			checkSection(where, dest, anchor, "")
		}
	}
}

// scan lists the files whose references are checked, relative to root.
func scan(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (skipDirs[d.Name()] || strings.HasPrefix(d.Name(), ".")) {
				return filepath.SkipDir
			}
			return nil
		}
		name := d.Name()
		if !d.Type().IsRegular() || !(name == "Makefile" || strings.HasSuffix(name, ".go") ||
			strings.HasSuffix(name, ".nix") || strings.HasSuffix(name, ".md")) {
			return nil
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		files = append(files, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// page is what a markdown file offers to be cited by: its headings' texts
// and their anchors as GitHub makes them.
type page struct {
	titles  map[string]bool
	anchors map[string]bool
}

func parsePage(text string) *page {
	p := &page{titles: map[string]bool{}, anchors: map[string]bool{}}
	seen := map[string]int{}
	for _, line := range strings.Split(withoutCode(text), "\n") {
		m := heading.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		p.titles[m[2]] = true
		a := anchor(m[2])
		if n := seen[a]; n > 0 {
			p.anchors[fmt.Sprintf("%s-%d", a, n)] = true
		} else {
			p.anchors[a] = true
		}
		seen[a]++
	}
	return p
}

// anchor is GitHub's anchor for a heading: lower case, punctuation other
// than '-' and '_' dropped, spaces made '-'.
func anchor(title string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(title) {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// withoutCode blanks fenced code blocks (keeping their lines, for line
// numbers): a '#' there is a shell comment, not a heading.
func withoutCode(text string) string {
	lines := strings.Split(text, "\n")
	fenced := false
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "```") {
			fenced = !fenced
			lines[i] = ""
			continue
		}
		if fenced {
			lines[i] = ""
		}
	}
	return strings.Join(lines, "\n")
}

func group(text string, m []int, i int) string {
	if m[2*i] < 0 {
		return ""
	}
	return text[m[2*i]:m[2*i+1]]
}

func lineOf(text string, off int) int { return strings.Count(text[:off], "\n") + 1 }

func TestAnchor(t *testing.T) {
	for title, want := range map[string]string{
		"Other Linux (systemd)":                              "other-linux-systemd",
		"Several machines, one bucket":                       "several-machines-one-bucket",
		"From `nix copy` in a post-build-hook":               "from-nix-copy-in-a-post-build-hook",
		"Over a distant bucket, and memory by closure shape": "over-a-distant-bucket-and-memory-by-closure-shape",
	} {
		if got := anchor(title); got != want {
			t.Errorf("anchor(%q) = %q, want %q", title, got, want)
		}
	}
}
