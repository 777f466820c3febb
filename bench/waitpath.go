package main

// waitpath: what a CI job feels while another job's large path uploads:
// `agentctl wait` for one small path of its own, over a distant, capped link.

import (
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/nixspool/nixspool/internal/testenv"
)

var waitBigMB = flag.Int("waitpath-big-mb", 300, "waitpath: size of the large path in MB")

func init() {
	register("waitpath", "50 ms RTT, 20 MB/s: agentctl wait for one small path while a large path uploads, against the same wait on the idle link", (*bench).waitPath)
}

func (b *bench) waitPath() error {
	const rtt, rate = 50 * time.Millisecond, 20e6
	dir := filepath.Join(b.work, "waitpath-src")
	os.MkdirAll(dir, 0o755)
	bigSrc := filepath.Join(dir, "big-"+randHex())
	data := make([]byte, *waitBigMB*1_000_000)
	rand.Read(data)
	if err := os.WriteFile(bigSrc, data, 0o644); err != nil {
		return err
	}
	data = nil
	var smalls []string
	for i := range 2 {
		f := filepath.Join(dir, fmt.Sprintf("small-%d-%s", i, randHex()))
		if err := os.WriteFile(f, []byte(randHex()+"\n"), 0o644); err != nil {
			return err
		}
		smalls = append(smalls, f)
	}
	paths, err := nixStoreAdd(b.env, append([]string{bigSrc}, smalls...)...)
	os.RemoveAll(dir)
	if err != nil {
		return err
	}
	defer deletePaths(b.env, paths)
	big, idleSmall, busySmall := paths[0], paths[1], paths[2]
	m, err := b.startMinIO()
	if err != nil {
		return err
	}
	p := testenv.StartDelayProxy(b.t, m.Endpoint, rtt/2, int64(rate))

	run := func(withBig bool, small string) (time.Duration, error) {
		name := b.bucketName()
		m.MakeBucket(name)
		sock, cmdA, err := b.agent("waitpath-"+randHex()[:6], m.BucketURLVia(p.Endpoint, name, ""), m.Env())
		if err != nil {
			return 0, err
		}
		defer stop(cmdA)
		if err := b.ensureCacheInfo(sock); err != nil {
			return 0, err
		}
		if withBig {
			sentBefore := p.BytesUp.Load()
			if err := push(sock, []string{big}); err != nil {
				return 0, err
			}
			// Until the large upload is well under way on the link.
			if err := waitBytesSent(p, sentBefore, 20_000_000); err != nil {
				return 0, err
			}
		}
		if err := push(sock, []string{small}); err != nil {
			return 0, err
		}
		t0 := time.Now()
		c := exec.Command(filepath.Join(*binDir, "agentctl"), "--socket", sock, "wait", "--timeout", "10m", small)
		if out, err := c.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("agentctl wait: %v: %s", err, out)
		}
		took := time.Since(t0)
		if withBig {
			if s, err := status(sock); err == nil && s.Pending+s.Uploading == 0 {
				return 0, fmt.Errorf("the large path was done before the wait returned: nothing was measured under load")
			}
		}
		return took, nil
	}
	idle, err := run(false, idleSmall)
	if err != nil {
		return err
	}
	busy, err := run(true, busySmall)
	if err != nil {
		return err
	}
	add(Row{Name: fmt.Sprintf("agentctl wait for 1 small path while a %d MB path uploads (%v RTT, 20 MB/s)", *waitBigMB, rtt), Value: busy.Seconds(), Unit: "s",
		Baseline: "same wait, idle link", BaseVal: idle.Seconds(), Target: "≤ 2× idle"})
	return nil
}
