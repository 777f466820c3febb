// Command hook is nixspool's post-build-hook. Nix runs it with no arguments
// after each build, with OUT_PATHS and DRV_PATH in the environment; it hands
// the built outputs to agentd and exits within NIXSPOOL_TIMEOUT (default 2s).
// Nix waits for it: before 2.35 with its whole build loop, since 2.35 (hooks
// run asynchronously, up to max-jobs at once) only in the builds that depend
// on the hooked outputs.
//
// Environment: NIXSPOOL_SOCKET (default /run/nixspool/agentd.sock),
// NIXSPOOL_STATE_DIR (default /var/lib/nixspool; spool/ below it),
// NIXSPOOL_TIMEOUT (default 2s), NIXSPOOL_STRICT=1 (fail the build when the
// paths could not be handed to agentd), NIXSPOOL_GC_ROOTS (agentd's GC roots
// directory, where spooled paths are rooted; default
// /nix/var/nix/gcroots/nixspool, "off" to disable).
package main

import (
	"fmt"
	"os"

	"github.com/nixspool/nixspool/internal/hook"
)

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: hook (no arguments; configure it as post-build-hook in nix.conf)")
		if os.Args[1] == "--help" || os.Args[1] == "-h" {
			os.Exit(0)
		}
		os.Exit(2)
	}
	os.Exit(hook.Run(os.Getenv, os.Stderr))
}
