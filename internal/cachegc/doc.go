// Package cachegc collects a plain binary-cache bucket while any number of
// agents keep uploading to it, without a server: the collector and the
// agents coordinate through a few objects in the bucket. docs/gc.md is
// the full design, with the safety argument and its limits; in short:
//
// Roots are the narinfos written (or re-written) within the retention
// (--keep-since, by their LastModified on the store's clock), pins
// (nixspool/pins/<name>), and recent realisations; everything they reach
// through References is live. The one invariant that matters: at every
// instant, every narinfo's NAR exists and every reference has a narinfo.
//
// A cycle (Run), holding the bucket's lease (nixspool/gc/lease, taken
// with a create-only write, renewed and taken over with If-Match):
//
//  1. mark at T_m: list the bucket, read the narinfos the reference cache
//     (RefCache, by ETag) does not know, find what the roots do not reach;
//  2. announce it (nixspool/gc/doomed/<cycle>.json.zst; its LastModified
//     is T_a) and wait the grace G, by the local clock, from the moment
//     the announcement was certainly written;
//  3. sweep: list again; every narinfo modified since T_m and every pin is
//     a fresh root; delete the announced narinfos that no fresh root
//     reaches and that were not modified since T_m, referrers first, one
//     layer per request; then the NARs no remaining narinfo points at,
//     then listings and logs; checking the lease and the sweep's deadline
//     (T_a+G+W, less the margin M) before every delete request;
//  4. retire the cycle (nixspool/gc/done/<cycle>).
//
// Agents run a Watcher (the uploader's Guard): it lists the announcements
// every poll interval, drops announced paths from the presence cache, and
// answers Check before every narinfo write: from T_a+G-M (the danger zone,
// bounded without comparing the agent's clock with the store's) until the
// cycle is retired or T_a+G+W+M, no narinfo may rely on an announced
// object. Before the danger zone it may, and it makes what it relies on a
// fresh root of the sweep. A Check whose last listing is older than the
// staleness bound lists first; agents register that bound
// (nixspool/watchers/<id>), and a collector refuses a grace too short for
// it.
package cachegc
