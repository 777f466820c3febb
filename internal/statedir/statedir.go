// Package statedir names the files of agentd's state directory, which the
// hook, agentd and the collector share. It depends on the standard library
// only: the hook binary imports it and must stay small and static.
package statedir

import "path/filepath"

// Dir is a state directory (agentd's --state-dir).
type Dir string

// Spool is the directory the hook spools store paths into when agentd
// does not answer.
func (d Dir) Spool() string { return filepath.Join(string(d), "spool") }

// Queue is agentd's durable queue database.
func (d Dir) Queue() string { return filepath.Join(string(d), "queue.db") }

// Roots names agentd's GC roots directory ("off" when it keeps none), so
// that the hook roots what it spools where agentd will look.
func (d Dir) Roots() string { return filepath.Join(string(d), "gc-roots") }

// AgentID holds this agent's identity as a collector watcher and lease
// holder.
func (d Dir) AgentID() string { return filepath.Join(string(d), "gc-agent-id") }

// RefCache is the collector's cache of narinfo references.
func (d Dir) RefCache() string { return filepath.Join(string(d), "gc.db") }

// Temp holds agentd's temporary files.
func (d Dir) Temp() string { return filepath.Join(string(d), "tmp") }
