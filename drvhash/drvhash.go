// Package drvhash reads Nix derivations (.drv files, ATerm) and computes
// their "hash modulo", the hash that identifies a derivation output in a
// realisation id (sha256:<base16>!<output>) up to Nix 2.34.
//
// It follows Nix's own definition (src/libstore/derivations.cc,
// hashDerivationModulo and Derivation::unparse, unchanged in substance
// from Nix 2.4 to 2.34):
//
//   - a fixed-output derivation (every output has a path and an expected
//     hash) hashes, per output, the string
//     "fixed:out:<method+algo>:<base16 hash>:<output path>";
//   - any other derivation hashes its ATerm with every input derivation
//     path replaced by that input's own hash modulo (base16, computed
//     unmasked and recursively), the inputs re-sorted by that hash and the
//     output names of inputs that collapse to the same hash merged;
//   - the top-level hash (the one realisation ids use, Nix's
//     staticOutputHashes) additionally masks the outputs: output paths
//     and the environment variables named like outputs become "".
//
// The package has its own small ATerm reader and writer instead of
// go-nix's derivation package: go-nix refuses derivations with more than
// one floating content-addressed output and deferred (output path not yet
// known) outputs, which are exactly the ones realisations exist for, and
// it does not re-escape builder and arguments the way Nix prints them.
// Unparse(false, nil) reproduces a .drv file byte for byte (tested on the
// whole local store).
package drvhash

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
)

// Output is one output of a derivation as the .drv records it.
type Output struct {
	Name     string
	Path     string // "" for floating content-addressed and deferred outputs
	HashAlgo string // e.g. "r:sha256"; "" for input-addressed outputs
	Hash     string // base16; "" unless fixed ("impure" for impure outputs)
}

// Kind is what an output is, by the fields the .drv gives it.
type Kind int

// Output kinds, as Nix's DerivationOutput variants.
const (
	InputAddressed Kind = iota // path known from the derivation
	Fixed                      // content-addressed with an expected hash (fetchers)
	Floating                   // content-addressed, path known only after the build
	Deferred                   // input-addressed, but depends on floating outputs
	Impure
)

// Kind classifies the output.
func (o Output) Kind() Kind {
	switch {
	case o.Hash == "impure":
		return Impure
	case o.HashAlgo != "" && o.Hash != "":
		return Fixed
	case o.HashAlgo != "":
		return Floating
	case o.Path == "":
		return Deferred
	default:
		return InputAddressed
	}
}

// InputDrv is one input derivation and the outputs of it that are used.
type InputDrv struct {
	Path    string
	Outputs []string // sorted
}

// EnvVar is one environment variable of the builder.
type EnvVar struct{ Key, Value string }

// Derivation is a parsed .drv. Slices are in the order Nix keeps them
// (sorted by name, path or key), which is also the file's order.
type Derivation struct {
	Outputs   []Output
	InputDrvs []InputDrv
	InputSrcs []string
	Platform  string
	Builder   string
	Args      []string
	Env       []EnvVar
}

// StaticOutputs reports whether every output path is written in the .drv
// (input-addressed and fixed outputs). Such outputs need no realisation
// for a client to find them.
func (d *Derivation) StaticOutputs() bool {
	for _, o := range d.Outputs {
		if o.Path == "" {
			return false
		}
	}
	return true
}

// fixed reports whether d is a fixed-output derivation.
func (d *Derivation) fixed() bool {
	for _, o := range d.Outputs {
		if o.Kind() != Fixed {
			return false
		}
	}
	return len(d.Outputs) > 0
}

func (d *Derivation) impure() bool {
	for _, o := range d.Outputs {
		if o.Kind() == Impure {
			return true
		}
	}
	return false
}

// Parse reads a derivation in ATerm form (Derive(...)).
func Parse(b []byte) (*Derivation, error) {
	p := &parser{b: b}
	d, err := p.derivation()
	if err != nil {
		return nil, fmt.Errorf("parse derivation at byte %d: %w", p.i, err)
	}
	return d, nil
}

type parser struct {
	b []byte
	i int
}

func (p *parser) expect(s string) error {
	if !bytes.HasPrefix(p.b[p.i:], []byte(s)) {
		got := p.b[p.i:min(p.i+len(s)+8, len(p.b))]
		return fmt.Errorf("expected %q, found %q", s, got)
	}
	p.i += len(s)
	return nil
}

func (p *parser) peek(c byte) bool { return p.i < len(p.b) && p.b[p.i] == c }

// str reads a quoted string, undoing Nix's escapes (\n, \r, \t; a
// backslash before any other character stands for that character).
func (p *parser) str() (string, error) {
	if err := p.expect(`"`); err != nil {
		return "", err
	}
	start := p.i
	plain := true
	for ; p.i < len(p.b); p.i++ {
		switch p.b[p.i] {
		case '\\':
			plain = false
			p.i++
		case '"':
			raw := p.b[start:p.i]
			p.i++
			if plain {
				return string(raw), nil
			}
			return unescape(raw), nil
		}
	}
	return "", errors.New("unterminated string")
}

func unescape(raw []byte) string {
	var sb strings.Builder
	sb.Grow(len(raw))
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c == '\\' && i+1 < len(raw) {
			i++
			switch c = raw[i]; c {
			case 'n':
				c = '\n'
			case 'r':
				c = '\r'
			case 't':
				c = '\t'
			}
		}
		sb.WriteByte(c)
	}
	return sb.String()
}

// list reads "[" item ("," item)* "]".
func (p *parser) list(item func() error) error {
	if err := p.expect("["); err != nil {
		return err
	}
	if p.peek(']') {
		p.i++
		return nil
	}
	for {
		if err := item(); err != nil {
			return err
		}
		if p.peek(',') {
			p.i++
			continue
		}
		return p.expect("]")
	}
}

func (p *parser) strs() ([]string, error) {
	out := []string{}
	err := p.list(func() error {
		s, err := p.str()
		out = append(out, s)
		return err
	})
	return out, err
}

// tuple reads "(" s1 "," s2 ... ")" of n strings.
func (p *parser) tuple(n int) ([]string, error) {
	if err := p.expect("("); err != nil {
		return nil, err
	}
	out := make([]string, n)
	for k := 0; k < n; k++ {
		if k > 0 {
			if err := p.expect(","); err != nil {
				return nil, err
			}
		}
		s, err := p.str()
		if err != nil {
			return nil, err
		}
		out[k] = s
	}
	return out, p.expect(")")
}

func (p *parser) derivation() (*Derivation, error) {
	if bytes.HasPrefix(p.b, []byte("DrvWithVersion(")) {
		return nil, errors.New("DrvWithVersion derivations (dynamic derivations) are not supported")
	}
	d := &Derivation{}
	if err := p.expect("Derive("); err != nil {
		return nil, err
	}
	err := p.list(func() error {
		f, err := p.tuple(4)
		if err != nil {
			return err
		}
		if n := len(d.Outputs); n > 0 && d.Outputs[n-1].Name >= f[0] {
			return fmt.Errorf("outputs not sorted (%q after %q)", f[0], d.Outputs[n-1].Name)
		}
		d.Outputs = append(d.Outputs, Output{Name: f[0], Path: f[1], HashAlgo: f[2], Hash: f[3]})
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.expect(","); err != nil {
		return nil, err
	}
	err = p.list(func() error {
		if err := p.expect("("); err != nil {
			return err
		}
		path, err := p.str()
		if err != nil {
			return err
		}
		if err := p.expect(","); err != nil {
			return err
		}
		outs, err := p.strs()
		if err != nil {
			return err
		}
		if n := len(d.InputDrvs); n > 0 && d.InputDrvs[n-1].Path >= path {
			return fmt.Errorf("input derivations not sorted (%q after %q)", path, d.InputDrvs[n-1].Path)
		}
		d.InputDrvs = append(d.InputDrvs, InputDrv{Path: path, Outputs: outs})
		return p.expect(")")
	})
	if err != nil {
		return nil, err
	}
	for _, step := range []func() error{
		func() (err error) { d.InputSrcs, err = p.strs(); return },
		func() (err error) { d.Platform, err = p.str(); return },
		func() (err error) { d.Builder, err = p.str(); return },
		func() (err error) { d.Args, err = p.strs(); return },
	} {
		if err := p.expect(","); err != nil {
			return nil, err
		}
		if err := step(); err != nil {
			return nil, err
		}
	}
	if err := p.expect(","); err != nil {
		return nil, err
	}
	err = p.list(func() error {
		f, err := p.tuple(2)
		if err != nil {
			return err
		}
		if n := len(d.Env); n > 0 && d.Env[n-1].Key >= f[0] {
			return fmt.Errorf("environment not sorted (%q after %q)", f[0], d.Env[n-1].Key)
		}
		d.Env = append(d.Env, EnvVar{Key: f[0], Value: f[1]})
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.expect(")"); err != nil {
		return nil, err
	}
	if p.i != len(p.b) {
		return nil, errors.New("trailing data after the derivation")
	}
	if len(d.Outputs) == 0 {
		return nil, errors.New("no outputs")
	}
	return d, nil
}

// Unparse prints d as Nix's Derivation::unparse does. With mask, output
// paths and the environment variables named like outputs are printed
// empty. inputs, if not nil, replaces the input derivations: hash (base16)
// → output names.
func (d *Derivation) Unparse(mask bool, inputs map[string][]string) []byte {
	var b bytes.Buffer
	b.Grow(4096)
	b.WriteString("Derive([")
	for i, o := range d.Outputs {
		if i > 0 {
			b.WriteByte(',')
		}
		path := o.Path
		if mask {
			path = ""
		}
		b.WriteByte('(')
		unquoted(&b, o.Name)
		b.WriteByte(',')
		unquoted(&b, path)
		b.WriteByte(',')
		unquoted(&b, o.HashAlgo)
		b.WriteByte(',')
		unquoted(&b, o.Hash)
		b.WriteByte(')')
	}
	b.WriteString("],[")
	if inputs != nil {
		keys := make([]string, 0, len(inputs))
		for k := range inputs {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteByte('(')
			unquoted(&b, k)
			b.WriteByte(',')
			unquotedList(&b, inputs[k])
			b.WriteByte(')')
		}
	} else {
		for i, in := range d.InputDrvs {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteByte('(')
			unquoted(&b, in.Path)
			b.WriteByte(',')
			unquotedList(&b, in.Outputs)
			b.WriteByte(')')
		}
	}
	b.WriteString("],")
	unquotedList(&b, d.InputSrcs)
	b.WriteByte(',')
	unquoted(&b, d.Platform)
	b.WriteByte(',')
	escaped(&b, d.Builder)
	b.WriteString(",[")
	for i, a := range d.Args {
		if i > 0 {
			b.WriteByte(',')
		}
		escaped(&b, a)
	}
	b.WriteString("],[")
	for i, e := range d.Env {
		if i > 0 {
			b.WriteByte(',')
		}
		v := e.Value
		if mask && d.hasOutput(e.Key) {
			v = ""
		}
		b.WriteByte('(')
		escaped(&b, e.Key)
		b.WriteByte(',')
		escaped(&b, v)
		b.WriteByte(')')
	}
	b.WriteString("])")
	return b.Bytes()
}

func (d *Derivation) hasOutput(name string) bool {
	for _, o := range d.Outputs {
		if o.Name == name {
			return true
		}
	}
	return false
}

func unquoted(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	b.WriteString(s)
	b.WriteByte('"')
}

func unquotedList(b *bytes.Buffer, ss []string) {
	b.WriteByte('[')
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(',')
		}
		unquoted(b, s)
	}
	b.WriteByte(']')
}

// escaped prints s as Nix's printString: quoted, with \", \\, \n, \r, \t.
func escaped(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '"', '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
}

// Hasher computes hashes modulo of derivations read from the store,
// remembering each derivation's (unmasked) result as Nix does, since the
// same inputs recur in every derivation of a build graph. It is safe for
// concurrent use.
type Hasher struct {
	// Read returns the contents of a .drv (os.ReadFile if nil).
	Read func(path string) ([]byte, error)

	mu   sync.Mutex
	memo map[string]map[string][32]byte // drv path → output → unmasked hash
}

// maxMemo bounds the remembered results (a few hundred bytes each).
const maxMemo = 200_000

// Load reads and parses the derivation at path.
func (h *Hasher) Load(path string) (*Derivation, error) {
	read := h.Read
	if read == nil {
		read = os.ReadFile
	}
	b, err := read(path)
	if err != nil {
		return nil, err
	}
	d, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return d, nil
}

// OutputHashes returns, for each output of d, the hash that names it in
// a realisation id: "sha256:<base16>" (Nix's staticOutputHashes). Input
// derivations are read with Read.
func (h *Hasher) OutputHashes(d *Derivation) (map[string]string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	raw, err := h.modulo(d, true, map[string]bool{})
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(raw))
	for name, sum := range raw {
		out[name] = "sha256:" + hex.EncodeToString(sum[:])
	}
	return out, nil
}

// ID is the realisation id of output of the derivation d.
func (h *Hasher) ID(d *Derivation, output string) (string, error) {
	hashes, err := h.OutputHashes(d)
	if err != nil {
		return "", err
	}
	hash, ok := hashes[output]
	if !ok {
		return "", fmt.Errorf("derivation has no output %q", output)
	}
	return hash + "!" + output, nil
}

// modulo is Nix's hashDerivationModulo. Called with h.mu held.
func (h *Hasher) modulo(d *Derivation, mask bool, visiting map[string]bool) (map[string][32]byte, error) {
	out := make(map[string][32]byte, len(d.Outputs))
	if d.fixed() {
		for _, o := range d.Outputs {
			out[o.Name] = sha256.Sum256([]byte("fixed:out:" + o.HashAlgo + ":" + o.Hash + ":" + o.Path))
		}
		return out, nil
	}
	if d.impure() {
		// Impure outputs all hash to sha256("impure"); they are never
		// registered as realisations.
		for _, o := range d.Outputs {
			out[o.Name] = sha256.Sum256([]byte("impure"))
		}
		return out, nil
	}
	inputs := make(map[string][]string, len(d.InputDrvs))
	for _, in := range d.InputDrvs {
		hashes, err := h.inputModulo(in.Path, visiting)
		if err != nil {
			return nil, err
		}
		for _, name := range in.Outputs {
			sum, ok := hashes[name]
			if !ok {
				return nil, fmt.Errorf("input derivation %s has no output %q", in.Path, name)
			}
			k := hex.EncodeToString(sum[:])
			inputs[k] = mergeSorted(inputs[k], name)
		}
	}
	sum := sha256.Sum256(d.Unparse(mask, inputs))
	for _, o := range d.Outputs {
		out[o.Name] = sum
	}
	return out, nil
}

// inputModulo is Nix's pathDerivationModulo: the unmasked hash of the
// derivation at path, remembered.
func (h *Hasher) inputModulo(path string, visiting map[string]bool) (map[string][32]byte, error) {
	if r, ok := h.memo[path]; ok {
		return r, nil
	}
	if visiting[path] {
		return nil, fmt.Errorf("derivation %s depends on itself", path)
	}
	visiting[path] = true
	defer delete(visiting, path)
	d, err := h.Load(path)
	if err != nil {
		return nil, fmt.Errorf("input derivation: %w", err)
	}
	r, err := h.modulo(d, false, visiting)
	if err != nil {
		return nil, err
	}
	if h.memo == nil || len(h.memo) >= maxMemo {
		h.memo = map[string]map[string][32]byte{}
	}
	h.memo[path] = r
	return r, nil
}

// mergeSorted adds s to the sorted set ss.
func mergeSorted(ss []string, s string) []string {
	i := sort.SearchStrings(ss, s)
	if i < len(ss) && ss[i] == s {
		return ss
	}
	ss = append(ss, "")
	copy(ss[i+1:], ss[i:])
	ss[i] = s
	return ss
}
