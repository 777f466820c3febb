// Package bucket is the small object-store interface the uploader writes a
// binary cache through, with implementations for S3 (bucket/s3) and a local
// directory (bucket/file). The contract is checked for both by one suite,
// bucket/buckettest.
package bucket

import (
	"context"
	"errors"
	"io"
	"time"
)

// ErrNotExist is wrapped by Stat and Get when the key does not exist.
var ErrNotExist = errors.New("object does not exist")

// ErrPermanent is wrapped by errors that retrying cannot fix (access
// denied, no such bucket, invalid credentials).
var ErrPermanent = errors.New("permanent bucket error")

// ErrUnavailable is wrapped by errors that say the bucket cannot be reached
// or is overloaded right now (network errors, HTTP 5xx, throttling): every
// other request would fail the same way, so callers should pause and probe
// rather than keep trying.
var ErrUnavailable = errors.New("bucket unavailable")

// RetryAfterError carries the delay a server asked for (Retry-After).
type RetryAfterError struct {
	Err   error
	After time.Duration
}

func (e *RetryAfterError) Error() string { return e.Err.Error() }
func (e *RetryAfterError) Unwrap() error { return e.Err }

// RetryAfter returns the delay the server asked for, if any.
func RetryAfter(err error) (time.Duration, bool) {
	var ra *RetryAfterError
	if errors.As(err, &ra) {
		return ra.After, true
	}
	return 0, false
}

// PutOptions are the object's HTTP metadata.
type PutOptions struct {
	ContentType     string
	ContentEncoding string
}

// Info describes an object.
type Info struct {
	Size int64
}

// Bucket stores objects by key ("nar/abc.nar.zst", "abc.narinfo").
//
// Put is atomic: readers see either no object or the complete one, never a
// partial object. Putting the same key twice with the same content is
// harmless. A Put whose reader yields fewer or more than size bytes fails
// and leaves no object behind. Methods honour ctx cancellation.
type Bucket interface {
	// Stat returns the object's info, or an error wrapping ErrNotExist.
	Stat(ctx context.Context, key string) (Info, error)
	// Put writes size bytes from r (an io.ReaderAt/io.Seeker such as an
	// *os.File lets implementations retry and upload in parallel parts).
	Put(ctx context.Context, key string, r io.Reader, size int64, opts PutOptions) error
	// Get returns the whole object if it is at most max bytes.
	Get(ctx context.Context, key string, max int64) ([]byte, error)
	// Delete removes the object; deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// String names the bucket for logs (no secrets).
	String() string
}

// IsNotExist reports whether err means the object does not exist.
func IsNotExist(err error) bool { return errors.Is(err, ErrNotExist) }

// IsPermanent reports whether err cannot be fixed by retrying.
func IsPermanent(err error) bool { return errors.Is(err, ErrPermanent) }

// Part is one uploaded part of a multipart upload.
type Part struct {
	Number int
	ETag   string // MD5 of the part's bytes, hex, for unencrypted S3 objects
	Size   int64
}

// Multipart is implemented by buckets whose large uploads can be resumed
// after a crash: the upload ID and the completed parts survive on the
// server, so only the missing parts need sending again. An object only
// becomes visible when CompleteMultipart succeeds.
type Multipart interface {
	StartMultipart(ctx context.Context, key string, opts PutOptions) (uploadID string, err error)
	// ListParts returns the parts the server holds; an error wrapping
	// ErrNotExist means the upload is gone (completed or aborted).
	ListParts(ctx context.Context, key, uploadID string) ([]Part, error)
	// PutPart uploads one part; md5, if not nil, is checked by the server.
	PutPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64, md5 []byte) (Part, error)
	CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error
	AbortMultipart(ctx context.Context, key, uploadID string) error
}
