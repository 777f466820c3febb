// Package realisation publishes the realisations of content-addressed
// derivation outputs to a binary cache, so that another machine finds a
// floating content-addressed output (which has no path in its .drv) by
// its derivation instead of building it.
//
// # What Nix reads
//
// Checked against Nix's source (realisation.cc, binary-cache-store.cc,
// build/drv-output-substitution-goal.cc, build/derivation-goal.cc) for
// 2.8 and 2.35, and by experiment with Nix 2.8:
//
// Nix 2.4 … 2.34 look up
//
//	realisations/<id>.doi     id = sha256:<base16 hash modulo of the drv>!<output>
//
// a JSON object, keys sorted, no whitespace (nlohmann's dump):
//
//	{"dependentRealisations":{"<id>":"<out base name>",…},"id":"<id>","outPath":"<base name>","signatures":["name:base64",…]}
//
// A signature signs the same object without "signatures"; Nix 2.34 signs
// and writes "dependentRealisations":{} instead (it no longer has them) and
// does not read them. The client
// computes the id from the derivation it evaluated (drvhash), fetches the
// realisation, then substitutes every dependent realisation the same way
// and the output path by its narinfo; only when all of that succeeded does
// it register the realisation. A missing dependent realisation makes the
// whole substitution fail and Nix builds instead, so the cache must hold
// the realisation closure. Nix 2.8 does not check realisation signatures
// when substituting; they are written for readers that do.
//
// Nix 2.35 keys realisations ("build trace entries") by derivation path
// and records them only for resolved derivations (no input derivations):
//
//	build-trace-v2/<drv base name>/<output>.doi   {"outPath":"<base name>","signatures":[{"keyName":"…","sig":"<base64>"}]}
//
// signed over {"key":{"drvPath":"<drv base name>","outputName":"<output>"},"value":{"outPath":"<base name>"}}.
// A 2.35 client looks up the entry of the derivation it evaluated first
// (Nix writes none for a derivation with input derivations, and neither
// does nixspool), then resolves it (substituting its inputs' entries) and
// looks up the resolved derivation's entry. Clients of 2.33 and 2.34 do
// the same in the realisations/ layout, where the unresolved
// derivation's realisation exists.
//
// # What is written
//
// Both layouts. For a store path P (after P's narinfo is in the cache) the
// Realiser looks at the derivations known to have produced P: P's deriver
// (for a resolved build, the resolved derivation) and the derivations the
// post-build hook named for P. Nix ≤ 2.32 names the unresolved derivation,
// whose id clients compute; since 2.33 (NixOS/nix commit 2ee41976c2) the
// hook runs for the resolved derivation and names that one, and the
// unresolved one is searched for among the referrers of the resolved
// one's sources and of their derivers (searchUnresolved). A derivation whose output paths are all written in the .drv
// needs no realisation and costs no daemon query. For the others it asks
// the Nix daemon which output is P (QueryDerivationOutputMap, which also
// proves the daemon has ca-derivations on: a Nix 2.8 daemon without it
// aborts on a realisation query), computes the id, and fetches the
// realisation and, recursively, the realisations it depends on
// (QueryRealisation). Every realisation is signed with our keys (keeping
// signatures the store has from other keys) and written in the
// realisations/ layout, dependencies first (package nixsig has the rule
// for signatures and their order: ours, plus other keys' signatures the
// store holds over the same document, so a build-trace-v2/ entry made from
// a Nix ≤ 2.34 realisation carries only ours); a realisation whose
// derivation path is known and has no input derivations is also written
// in the build-trace-v2/ layout. A dependency is accepted only if its
// output is a reference of the output that depends on it, so that its
// narinfo is in the cache already (closure order); otherwise the
// realisation is left out rather than written early.
//
// A Nix 2.35 daemon answers realisation queries only over the
// realisation-with-path-not-hash protocol feature, which nixstore
// negotiates; it keys them by derivation path (QueryBuildTrace). From such
// a daemon the build trace entry is written with the daemon's signatures
// from other keys (they sign the entry), and a hash-keyed realisation only
// for a derivation without input derivations, which depends on no other
// (entries record no dependencies); Nix 2.35 records entries for resolved
// derivations only, so no unresolved derivation is searched for.
package realisation
