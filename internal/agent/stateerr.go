package agent

import "sync"

// stateError is the last error of the state directory (the queue, the
// spool), for status; a success clears it.
type stateError struct {
	mu  sync.Mutex
	err string
}

func (s *stateError) set(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		s.err = ""
	} else {
		s.err = err.Error()
	}
}

func (s *stateError) get() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
