package nixstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"strings"

	"github.com/nix-community/go-nix/pkg/wire"

	"github.com/nixspool/nixspool/nixsig"
)

// Realisation is what the store records about one output of a derivation
// built (or substituted) with the ca-derivations feature: which store path
// realises it, who signed that claim, and which other realisations it
// relies on. It mirrors Nix's JSON (realisation.cc, Nix 2.4 … 2.34).
type Realisation struct {
	// ID is the derivation output: "sha256:<base16 hash modulo of the
	// derivation>!<output name>".
	ID string `json:"id"`
	// OutPath is the base name of the output path (no store directory).
	OutPath    string   `json:"outPath"`
	Signatures []string `json:"signatures"`
	// DependentRealisations maps the ids of the realisations this one
	// depends on to their output base names.
	DependentRealisations map[string]string `json:"dependentRealisations"`
}

// ErrRealisationsUnsupported wraps the daemon's refusal to answer a
// realisation query: the ca-derivations feature is off in the daemon, or
// the daemon speaks a realisation format this client does not (Nix 2.35
// keys realisations by derivation path behind a protocol feature).
var ErrRealisationsUnsupported = errors.New("the Nix daemon does not answer realisation queries")

// ErrKeyedByPath: the daemon (Nix 2.35 and later) keys realisations by
// derivation path; ask it with QueryBuildTrace. It wraps
// ErrRealisationsUnsupported.
var ErrKeyedByPath = fmt.Errorf("%w by hash: it keys them by derivation path (Nix 2.35 and later)", ErrRealisationsUnsupported)

// BuildTraceEntry is what a Nix 2.35 or later store records for one output
// of a derivation (a realisation keyed by derivation path): the output
// path and the signatures over the entry's fingerprint.
type BuildTraceEntry struct {
	OutPath    string   // base name
	Signatures []string // "name:base64"
}

// QueryBuildTrace returns the build trace entry the store holds for output
// of the derivation at drv, or nil if there is none. It needs a daemon
// that negotiated the realisation-with-path-not-hash protocol feature
// (Nix 2.35 and later); with any other it returns an error wrapping
// ErrRealisationsUnsupported.
func (s *Store) QueryBuildTrace(ctx context.Context, drv, output string) (*BuildTraceEntry, error) {
	var out *BuildTraceEntry
	err := s.with(ctx, func(c *conn) error {
		if !c.features[featureRealisationWithPath] {
			return fmt.Errorf("%w by derivation path (protocol 1.%d without %s)", ErrRealisationsUnsupported, c.minor(), featureRealisationWithPath)
		}
		if err := c.send(opQueryRealisation, drv, output); err != nil {
			return err
		}
		e, err := c.readOptionalBuildTrace()
		out = e
		return err
	})
	if err != nil {
		var de *DaemonError
		if errors.As(err, &de) {
			err = fmt.Errorf("%w: %w", ErrRealisationsUnsupported, err)
		}
		return nil, fmt.Errorf("query build trace %s^%s: %w", drv, output, err)
	}
	return out, nil
}

// readOptionalBuildTrace reads an optional unkeyed realisation as a
// connection with realisation-with-path-not-hash sends it: a tag (0 none,
// 1 some), the output path, the signatures.
func (c *conn) readOptionalBuildTrace() (*BuildTraceEntry, error) {
	tag, err := wire.ReadUint64(c.r)
	if err != nil {
		return nil, err
	}
	switch tag {
	case 0:
		return nil, nil
	case 1:
	default:
		return nil, fmt.Errorf("bad optional build trace tag %d", tag)
	}
	p, err := wire.ReadString(c.r, maxString)
	if err != nil {
		return nil, err
	}
	sigs, err := c.readStrings()
	if err != nil {
		return nil, err
	}
	base := path.Base(p)
	if !strings.HasPrefix(p, "/") || strings.Count(p, "/") < 2 || base == "" {
		return nil, fmt.Errorf("build trace output %q is not a store path", p)
	}
	nixsig.SortStrings(sigs)
	return &BuildTraceEntry{OutPath: base, Signatures: sigs}, nil
}

// QueryRealisation returns the realisation the store holds for the
// derivation output id ("sha256:<hash>!<output>"), or nil if there is none.
func (s *Store) QueryRealisation(ctx context.Context, id string) (*Realisation, error) {
	if _, _, err := SplitDrvOutput(id); err != nil {
		return nil, err
	}
	var out *Realisation
	err := s.with(ctx, func(c *conn) error {
		if c.minor() < 31 {
			return fmt.Errorf("%w (protocol 1.%d; realisations need 1.31, Nix 2.4)", ErrRealisationsUnsupported, c.minor())
		}
		if c.features[featureRealisationWithPath] {
			return ErrKeyedByPath
		}
		if err := c.send(opQueryRealisation, id); err != nil {
			return err
		}
		docs, err := c.readStrings()
		if err != nil {
			return err
		}
		if len(docs) > 1 {
			return fmt.Errorf("daemon sent %d realisations for one id", len(docs))
		}
		if len(docs) == 1 {
			r, err := ParseRealisation([]byte(docs[0]))
			if err != nil {
				return err
			}
			out = r
		}
		return nil
	})
	if err != nil {
		var de *DaemonError
		if errors.As(err, &de) {
			// The daemon refused the request itself (the connection
			// stays usable); most likely ca-derivations is off there.
			err = fmt.Errorf("%w: %w", ErrRealisationsUnsupported, err)
		}
		return nil, fmt.Errorf("query realisation %s: %w", id, err)
	}
	if out != nil && out.ID != id {
		return nil, fmt.Errorf("query realisation %s: daemon answered for %s", id, out.ID)
	}
	return out, nil
}

// ParseRealisation decodes a realisation in Nix's JSON form and checks the
// fields a reader relies on.
func ParseRealisation(doc []byte) (*Realisation, error) {
	var r Realisation
	if err := json.Unmarshal(doc, &r); err != nil {
		return nil, fmt.Errorf("realisation: %w", err)
	}
	if _, _, err := SplitDrvOutput(r.ID); err != nil {
		return nil, fmt.Errorf("realisation: %w", err)
	}
	if r.OutPath == "" || strings.Contains(r.OutPath, "/") {
		return nil, fmt.Errorf("realisation %s: outPath %q is not a store path base name", r.ID, r.OutPath)
	}
	for dep, p := range r.DependentRealisations {
		if _, _, err := SplitDrvOutput(dep); err != nil {
			return nil, fmt.Errorf("realisation %s: dependency: %w", r.ID, err)
		}
		if p == "" || strings.Contains(p, "/") {
			return nil, fmt.Errorf("realisation %s: dependency %s: outPath %q is not a store path base name", r.ID, dep, p)
		}
	}
	if r.DependentRealisations == nil {
		r.DependentRealisations = map[string]string{}
	}
	nixsig.SortStrings(r.Signatures)
	return &r, nil
}

// SplitDrvOutput splits a derivation output id "sha256:<64 hex>!<output>"
// into its hash (with the "sha256:" prefix) and output name.
func SplitDrvOutput(id string) (hash, output string, err error) {
	hash, output, ok := strings.Cut(id, "!")
	hex, prefixed := strings.CutPrefix(hash, "sha256:")
	if !ok || !prefixed || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" || output == "" || strings.ContainsAny(output, "/!") {
		return "", "", fmt.Errorf("%q is not a derivation output id (sha256:<base16 hash>!<output>)", id)
	}
	return hash, output, nil
}
