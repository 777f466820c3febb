// Package bucket is the small object-store interface the uploader, the
// auditor and the collector work through, with implementations for S3
// (bucket/s3), an HTTP binary cache (bucket/httpcache) and a local
// directory (bucket/file). The contract is checked for each by one suite,
// bucket/buckettest.
package bucket

import (
	"context"
	"errors"
	"io"
	"time"
)

// ErrNotExist is wrapped by Stat, Get and Open when the key does not exist.
var ErrNotExist = errors.New("object does not exist")

// ErrPermanent is wrapped by errors that retrying cannot fix (access
// denied, no such bucket, invalid credentials, a request the store rejects
// as malformed).
var ErrPermanent = errors.New("permanent bucket error")

// ErrUnavailable is wrapped by errors that say the bucket cannot be reached
// or is overloaded right now (network errors, HTTP 5xx, throttling): every
// other request would fail the same way, so callers should pause and probe
// rather than keep trying.
var ErrUnavailable = errors.New("bucket unavailable")

// ErrThrottled is wrapped (together with ErrUnavailable) by errors that ask
// the client to slow down: HTTP 429, 503 SlowDown and their relatives.
var ErrThrottled = errors.New("throttled")

// ErrPrecondition is wrapped by a conditional Put whose condition does not
// hold: the key exists (IfNoneMatch) or holds another version (IfMatch).
var ErrPrecondition = errors.New("precondition failed")

// ErrLocal is wrapped by errors that happened on this machine, not in the
// bucket: the body of a Put could not be read. They say nothing about the
// bucket's health.
var ErrLocal = errors.New("local I/O error")

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

// HintError is a permanent error with advice on what to change.
type HintError struct {
	Err  error
	Hint string
}

func (e *HintError) Error() string { return e.Err.Error() + " (hint: " + e.Hint + ")" }
func (e *HintError) Unwrap() error { return e.Err }

// PutOptions are the object's HTTP metadata and the write's condition.
type PutOptions struct {
	ContentType     string
	ContentEncoding string
	// StorageClass is sent as x-amz-storage-class (S3 only).
	StorageClass string
	// IfNoneMatch makes the write fail with ErrPrecondition if the key
	// exists. Stores that ignore the condition (see ProbeConditional)
	// overwrite instead.
	IfNoneMatch bool
	// IfMatch, if set, makes the write fail with ErrPrecondition unless the
	// key holds the object with this ETag.
	IfMatch string
	// SHA256 is the body's SHA-256, when the caller knows it. A store
	// that signs requests with it (S3) then sends a single-request body
	// as it is read, instead of reading it once before for a checksum.
	SHA256 []byte
}

// Info describes an object.
type Info struct {
	Size int64
	// ETag identifies this version of the object (quotes removed). A new
	// write of the key gives a new ETag unless the store derives ETags
	// from the content (S3 does for simple uploads).
	ETag string
	// LastModified is when the object was written, by the store's clock.
	// It may be zero in the answer to Put.
	LastModified time.Time
	// ContentEncoding is the object's Content-Encoding, where the answer
	// carries it (Stat, Get, Open; not listings).
	ContentEncoding string
}

// Object is one entry of a listing.
type Object struct {
	Key string
	Info
}

// ListOptions select what List returns.
type ListOptions struct {
	// Prefix restricts the listing to keys that start with it.
	Prefix string
	// StartAfter skips keys up to and including it.
	StartAfter string
	// Recursive lists keys below "/" as well; otherwise only the keys in
	// the prefix's own "directory" are returned (no common prefixes).
	Recursive bool
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
	// The returned Info carries at least the new ETag where the store
	// reports one.
	Put(ctx context.Context, key string, r io.Reader, size int64, opts PutOptions) (Info, error)
	// Get returns the whole object if it is at most max bytes.
	Get(ctx context.Context, key string, max int64) ([]byte, Info, error)
	// Open streams length bytes of the object from offset (length < 0: to
	// the end). The caller closes the reader.
	Open(ctx context.Context, key string, offset, length int64) (io.ReadCloser, Info, error)
	// Delete removes the object; deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// List calls fn for every object matching opts, in key order, until fn
	// returns an error (which List returns).
	List(ctx context.Context, opts ListOptions, fn func(Object) error) error
	// String names the bucket for logs (no secrets).
	String() string
}

// IsNotExist reports whether err means the object does not exist.
func IsNotExist(err error) bool { return errors.Is(err, ErrNotExist) }

// IsPermanent reports whether err cannot be fixed by retrying.
func IsPermanent(err error) bool { return errors.Is(err, ErrPermanent) }

// IsPrecondition reports whether a conditional Put found its condition false.
func IsPrecondition(err error) bool { return errors.Is(err, ErrPrecondition) }

// IsThrottled reports whether the store asked the client to slow down.
func IsThrottled(err error) bool { return errors.Is(err, ErrThrottled) }

// Part is one uploaded part of a multipart upload.
type Part struct {
	Number int
	ETag   string // MD5 of the part's bytes, hex, for unencrypted S3 objects
	Size   int64
}

// Upload is one multipart upload in progress on the server.
type Upload struct {
	Key       string // relative to the bucket's prefix
	UploadID  string
	Initiated time.Time
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
	// ListUploads returns the multipart uploads in progress under prefix
	// (relative to the bucket's own prefix).
	ListUploads(ctx context.Context, prefix string) ([]Upload, error)
}

// Clock is implemented by buckets that know the store's clock, which
// LastModified is measured by: Now estimates the store's current time
// (S3 buckets learn it from the Date header of recent answers).
type Clock interface {
	Now() time.Time
}

// Now returns the store's current time if b knows it, else the local time.
func Now(b Bucket) time.Time {
	if c, ok := b.(Clock); ok {
		return c.Now()
	}
	return time.Now()
}

// BoundedClock is a Clock that knows how far off its estimate may be.
type BoundedClock interface {
	Clock
	// NowWithin returns the estimate of the store's current time and a
	// bound on its error: the store's clock reads within bound of now.
	// Both come from the same measurement.
	NowWithin() (now time.Time, bound time.Duration)
}

// DefaultClockBound is the error assumed of a Clock that does not say
// (and of the local clock, for buckets without one): the one-second
// resolution of the times stores report.
const DefaultClockBound = time.Second

// UnknownClockBound is the bound a BoundedClock reports before it has
// measured anything: no estimate.
const UnknownClockBound = 24 * time.Hour

// NowWithin returns the store's current time as b knows it and a bound on
// the error of that estimate. Request limiters wrapped around b (Direct)
// are looked through.
func NowWithin(b Bucket) (time.Time, time.Duration) {
	for _, x := range []Bucket{b, Direct(b)} {
		if c, ok := x.(BoundedClock); ok {
			return c.NowWithin()
		}
	}
	return Now(b), DefaultClockBound
}

// BatchDeleter is implemented by buckets that delete many keys per request
// (S3's DeleteObjects). Keys are deleted in no particular order within one
// call; missing keys are not errors.
type BatchDeleter interface {
	DeleteMany(ctx context.Context, keys []string) error
}

// DeleteAll deletes keys, in batches where the bucket supports it. Within
// one call the order is unspecified: callers that need an order (referrers
// before what they refer to) call it once per step.
func DeleteAll(ctx context.Context, b Bucket, keys []string) error {
	if bd, ok := b.(BatchDeleter); ok {
		for len(keys) > 0 {
			n := min(len(keys), 1000)
			if err := bd.DeleteMany(ctx, keys[:n]); err != nil {
				return err
			}
			keys = keys[n:]
		}
		return nil
	}
	for _, k := range keys {
		if err := b.Delete(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

// Direct returns the bucket under the request limiters wrapped around b
// (anything with an Unwrap method returning a Bucket), for a request that
// must go out at once rather than wait for a slot.
func Direct(b Bucket) Bucket {
	for {
		u, ok := b.(interface{ Unwrap() Bucket })
		if !ok {
			return b
		}
		b = u.Unwrap()
	}
}

// ErrNoListing is wrapped (together with ErrPermanent) by List on a store
// that has no way to list its keys: an HTTP binary cache, which only
// answers GET, HEAD and PUT for keys it is asked about.
var ErrNoListing = errors.New("the store cannot list its keys")

// NoListingError returns the error of a store that cannot list its keys:
// "DESC cannot be listed (WHY)", wrapping ErrNoListing and ErrPermanent.
func NoListingError(desc, why string) error {
	return &noListingError{msg: desc + " cannot be listed (" + why + ")"}
}

type noListingError struct{ msg string }

func (e *noListingError) Error() string { return e.msg }
func (e *noListingError) Is(target error) bool {
	return target == ErrNoListing || target == ErrPermanent
}

// Unlistable is implemented by buckets that cannot list: their List
// always fails with ErrNoListing. NoListing says why, in one line
// (NoListingError).
type Unlistable interface {
	NoListing() error
}

// CheckListable returns nil if b (or the bucket under its request
// limiters) can list its keys, and otherwise the error saying why not,
// wrapping ErrNoListing and ErrPermanent. Whatever needs a listing (gc,
// the whole-cache audit) refuses up front with it; whatever can do
// without (presence) asks key by key instead.
func CheckListable(b Bucket) error {
	for _, x := range []Bucket{b, Direct(b)} {
		if u, ok := x.(Unlistable); ok {
			return u.NoListing()
		}
	}
	return nil
}
