package protocol

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"
)

// Call sends req to the agentd listening on socketPath and returns its
// response, all within timeout.
//
// It uses blocking system calls on a plain socket with SO_SNDTIMEO and
// SO_RCVTIMEO rather than package net: the hook is a short-lived process, and
// net's poller starts extra runtime threads that cost about a millisecond per
// hook.
func Call(socketPath string, req *Request, timeout time.Duration) (*Response, error) {
	return CallStream(socketPath, req, timeout, nil)
}

// CallStream is Call for long operations: progress lines that arrive
// before the response are passed to progress (if not nil). timeout bounds
// the wait for each line, not the whole call.
func CallStream(socketPath string, req *Request, timeout time.Duration, progress func(*Progress)) (*Response, error) {
	req.V = Version
	msg, err := Encode(req)
	if err != nil {
		return nil, err
	}
	if len(msg) > MaxRequestSize {
		return nil, ErrTooLarge
	}
	deadline := time.Now().Add(timeout)
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	defer syscall.Close(fd)
	if err := setTimeouts(fd, timeout); err != nil {
		return nil, err
	}
	if err := connect(fd, socketPath, deadline); err != nil {
		return nil, &DialError{Socket: socketPath, Err: err}
	}
	for len(msg) > 0 {
		n, err := syscall.Write(fd, msg)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			// agentd may answer and close before reading a request it
			// refuses (too many connections); its answer says more than
			// the broken pipe, so read it when there is one.
			if err == syscall.EPIPE || err == syscall.ECONNRESET {
				if resp, rerr := ReadResponse(&fdReader{fd: fd, deadline: deadline}); rerr == nil && resp.Progress == nil {
					return resp, nil
				}
			}
			return nil, fmt.Errorf("send to %s: %w", socketPath, timeoutErr(err))
		}
		msg = msg[n:]
	}
	r := &fdReader{fd: fd, deadline: deadline}
	if progress == nil {
		resp, err := ReadResponse(r)
		if err != nil {
			return nil, fmt.Errorf("read reply from %s: %w", socketPath, err)
		}
		return resp, nil
	}
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		r.deadline = time.Now().Add(timeout)
		resp, err := ReadResponse(br)
		if err != nil {
			return nil, fmt.Errorf("read reply from %s: %w", socketPath, err)
		}
		if resp.Progress == nil {
			return resp, nil
		}
		progress(resp.Progress)
	}
}

// DialError means agentd could not be reached at all.
type DialError struct {
	Socket string
	Err    error
}

func (e *DialError) Error() string { return fmt.Sprintf("connect to %s: %v", e.Socket, e.Err) }
func (e *DialError) Unwrap() error { return e.Err }

func connect(fd int, path string, deadline time.Time) error {
	sa := &syscall.SockaddrUnix{Name: path}
	for {
		err := syscall.Connect(fd, sa)
		switch {
		case err == nil:
			return nil
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN && time.Now().Before(deadline):
			// The listen backlog is full: agentd is busy. Try again shortly.
			time.Sleep(time.Millisecond)
			continue
		default:
			return timeoutErr(err)
		}
	}
}

func setTimeouts(fd int, d time.Duration) error {
	tv := syscall.NsecToTimeval(d.Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("set receive timeout: %w", err)
	}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv); err != nil {
		return fmt.Errorf("set send timeout: %w", err)
	}
	return nil
}

// ErrTimeout is returned when agentd does not answer in time.
var ErrTimeout = errors.New("timed out")

func timeoutErr(err error) error {
	if err == syscall.EAGAIN || err == syscall.EWOULDBLOCK {
		return ErrTimeout
	}
	return err
}

type fdReader struct {
	fd       int
	deadline time.Time
}

func (r *fdReader) Read(p []byte) (int, error) {
	for {
		if time.Now().After(r.deadline) {
			return 0, ErrTimeout
		}
		n, err := syscall.Read(r.fd, p)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 0, timeoutErr(err)
		}
		if n == 0 {
			return 0, io.EOF
		}
		return n, nil
	}
}
