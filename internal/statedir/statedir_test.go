package statedir

import "testing"

// TestNames: the file names agentd, the hook and the collector agree on,
// as existing state directories hold them.
func TestNames(t *testing.T) {
	d := Dir("/var/lib/nixspool")
	for _, c := range []struct{ got, want string }{
		{d.Spool(), "/var/lib/nixspool/spool"},
		{d.Queue(), "/var/lib/nixspool/queue.db"},
		{d.Roots(), "/var/lib/nixspool/gc-roots"},
		{d.AgentID(), "/var/lib/nixspool/gc-agent-id"},
		{d.RefCache(), "/var/lib/nixspool/gc.db"},
		{d.Temp(), "/var/lib/nixspool/tmp"},
	} {
		if c.got != c.want {
			t.Errorf("got %s, want %s", c.got, c.want)
		}
	}
}
