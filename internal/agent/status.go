package agent

import (
	"time"

	"github.com/nixspool/nixspool/protocol"
)

// status assembles the status view.
func (a *Agent) status() (*protocol.Status, error) {
	// The spool before the queue: an import commits its jobs before it
	// removes the file, so a request is always counted in one of them.
	spooled, _ := a.spool.list()
	st, err := a.queue.Stats()
	if err != nil {
		return nil, err
	}
	now := a.now()
	s := &protocol.Status{
		Version:           Version,
		UptimeSeconds:     int64(time.Since(a.started).Seconds()),
		Cache:             a.cache.String(),
		Pending:           st.Pending,
		Uploading:         st.Leased,
		Retrying:          st.Retrying,
		Failed:            st.Failed,
		Uploaded:          st.Uploaded,
		UploadedNARBytes:  st.NARBytes,
		UploadedFileBytes: st.FileBytes,
		UploadedPaths:     st.Paths,
		OldestPendingJob:  st.OldestActiveID,
		NewestJob:         st.NewestID,
		Skipped:           st.Skipped,
		LastError:         st.LastError,
		InProgress:        []protocol.Upload{},
	}
	s.UploadedRealisations = st.Realisations
	s.RatePathsPerSecond, s.RateNARBytesPerSec = a.rate.rates(now, a.started)
	if r := a.reachable.Load(); r != 0 {
		ok := r == 1
		s.CacheReachable = &ok
	}
	if !st.OldestActive.IsZero() {
		s.OldestPendingSeconds = int64(now.Sub(st.OldestActive).Seconds())
	}
	if !st.LastErrorAt.IsZero() {
		s.LastErrorAt = st.LastErrorAt.Unix()
	}
	if !st.NextRetry.IsZero() {
		s.NextRetryAt = st.NextRetry.Unix()
	}
	if probe, paused := a.breaker.pausedUntil(); paused && probe.Unix() > s.NextRetryAt {
		// Uploads wait for the next probe of the cache.
		s.NextRetryAt = probe.Unix()
	}
	for _, p := range a.uploader.InProgress() {
		s.InProgress = append(s.InProgress, protocol.Upload{Path: p.Path, BytesDone: p.Done(), BytesSize: p.Total})
	}
	s.StateDirError = a.stateErr.get()
	if a.uploader != nil {
		s.KnownPresent = a.uploader.Stats().KnownPresent
	}
	if a.window != nil {
		ws := a.window.Stats()
		s.RequestWindow, s.RequestsInFlight = ws.Limit, ws.InFlight
	}
	s.Spooled = spooled
	s.QueuedBySource = map[string]int{}
	for src, n := range st.BySource {
		s.QueuedBySource[src.String()] = n
	}
	s.Capture = a.captureStatus()
	if t := a.timeToCache.stats(now); t.N > 0 {
		s.TimeToCache = protocol.TimeToCache{Paths: t.N, P50Seconds: t.P50.Seconds(), P99Seconds: t.P99.Seconds()}
	}
	return s, nil
}
