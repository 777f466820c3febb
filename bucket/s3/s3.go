// Package s3 is a bucket.Bucket on S3 or any S3-compatible server (MinIO,
// Garage, R2, …), through minio-go.
package s3

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nixspool/nixspool/bucket"
	"github.com/nixspool/nixspool/cacheurl"
)

// Bucket is an S3 bucket (with an optional key prefix).
type Bucket struct {
	client *minio.Client
	name   string
	prefix string
	desc   string
	hints  *retryAfterTransport
}

var _ bucket.Bucket = (*Bucket)(nil)

// MinPartSize is the smallest multipart part size used; larger objects get
// larger parts so that no upload needs more than maxParts parts.
const (
	MinPartSize = 16 << 20
	maxParts    = 9000 // below S3's limit of 10,000, with headroom
)

// New connects to the bucket described by c. Credentials come from the
// usual AWS chain: with profile= the shared credentials file's profile
// first, then AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared file, and
// instance roles. They never appear in c.
func New(c *cacheurl.Cache) (*Bucket, error) {
	file := &credentials.FileAWSCredentials{Profile: c.Profile}
	chain := []credentials.Provider{&credentials.EnvAWS{}, file, &credentials.IAM{Client: &http.Client{}}}
	if c.Profile != "" {
		chain = []credentials.Provider{file, &credentials.EnvAWS{}, &credentials.IAM{Client: &http.Client{}}}
	}
	endpoint := c.Endpoint
	lookup := minio.BucketLookupAuto
	if endpoint == "" {
		endpoint = "s3." + c.Region + ".amazonaws.com"
	} else {
		// Like Nix, path-style addressing for custom endpoints unless told.
		lookup = minio.BucketLookupPath
	}
	switch c.PathStyle {
	case "path":
		lookup = minio.BucketLookupPath
	case "virtual":
		lookup = minio.BucketLookupDNS
	}
	tr, err := minio.DefaultTransport(c.Secure)
	if err != nil {
		return nil, err
	}
	tr.MaxIdleConnsPerHost = 64 // keep-alive for many small concurrent requests
	hints := &retryAfterTransport{base: tr}
	client, err := minio.New(endpoint, &minio.Options{
		Creds:        credentials.NewChainCredentials(chain),
		Secure:       c.Secure,
		Region:       c.Region,
		BucketLookup: lookup,
		Transport:    hints,
		// Short in-request retries only; outages are retried per job by
		// the queue with persisted backoff.
		MaxRetries: 3,
	})
	if err != nil {
		return nil, fmt.Errorf("s3 client: %w", err)
	}
	return &Bucket{client: client, name: c.Bucket, prefix: c.Prefix, desc: c.String(), hints: hints}, nil
}

func (b *Bucket) String() string { return b.desc }

// PartSize returns the multipart part size for an object of size bytes.
func PartSize(size int64) uint64 {
	ps := uint64(MinPartSize)
	if size > 0 {
		if need := uint64(size)/maxParts + 1; need > ps {
			ps = (need + (1<<20 - 1)) &^ (1<<20 - 1) // round up to MiB
		}
	}
	return ps
}

// Stat implements bucket.Bucket.
func (b *Bucket) Stat(ctx context.Context, key string) (bucket.Info, error) {
	info, err := b.client.StatObject(ctx, b.name, b.prefix+key, minio.StatObjectOptions{})
	if err != nil {
		return bucket.Info{}, fmt.Errorf("stat %s: %w", key, b.classify(err, true))
	}
	return bucket.Info{Size: info.Size}, nil
}

// Put implements bucket.Bucket. With a known size, large objects go up as a
// multipart upload whose part size keeps the part count under S3's limit;
// the returned size is checked against what was meant to be sent.
func (b *Bucket) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) error {
	if size >= 0 && size <= smallObject {
		return b.putSmall(ctx, key, r, size, opts)
	}
	info, err := b.client.PutObject(ctx, b.name, b.prefix+key, r, size, minio.PutObjectOptions{
		ContentType:     opts.ContentType,
		ContentEncoding: opts.ContentEncoding,
		PartSize:        PartSize(size),
		NumThreads:      2,
	})
	if err != nil {
		return fmt.Errorf("put %s: %w", key, b.classify(err, false))
	}
	if size >= 0 && info.Size != size {
		return fmt.Errorf("put %s: server stored %d bytes, want %d", key, info.Size, size)
	}
	return nil
}

// smallObject is the size up to which an object is read into memory and
// sent with its SHA-256 in the signature. minio-go would otherwise use
// chunked streaming signatures, whose per-chunk signing costs the server
// (and us) more than the object itself for narinfos and tiny NARs.
const smallObject = 1 << 20

func (b *Bucket) putSmall(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) error {
	data := make([]byte, size)
	if _, err := io.ReadFull(r, data); err != nil {
		return fmt.Errorf("put %s: read body: %w", key, err)
	}
	if n, _ := r.Read(make([]byte, 1)); n > 0 {
		return fmt.Errorf("put %s: body longer than %d bytes", key, size)
	}
	sum := sha256.Sum256(data)
	info, err := b.core().PutObject(ctx, b.name, b.prefix+key, bytes.NewReader(data), size, "", hex.EncodeToString(sum[:]),
		minio.PutObjectOptions{ContentType: opts.ContentType, ContentEncoding: opts.ContentEncoding})
	if err != nil {
		return fmt.Errorf("put %s: %w", key, b.classify(err, false))
	}
	if info.Size != size {
		return fmt.Errorf("put %s: server stored %d bytes, want %d", key, info.Size, size)
	}
	return nil
}

// Get implements bucket.Bucket.
func (b *Bucket) Get(ctx context.Context, key string, max int64) ([]byte, error) {
	obj, err := b.client.GetObject(ctx, b.name, b.prefix+key, minio.GetObjectOptions{})
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", key, b.classify(err, true))
	}
	defer obj.Close()
	data, err := io.ReadAll(io.LimitReader(obj, max+1))
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", key, b.classify(err, true))
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("get %s: larger than %d bytes", key, max)
	}
	return data, nil
}

// Delete implements bucket.Bucket.
func (b *Bucket) Delete(ctx context.Context, key string) error {
	if err := b.client.RemoveObject(ctx, b.name, b.prefix+key, minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("delete %s: %w", key, b.classify(err, false))
	}
	return nil
}

var _ bucket.Multipart = (*Bucket)(nil)

func (b *Bucket) core() minio.Core { return minio.Core{Client: b.client} }

// StartMultipart implements bucket.Multipart.
func (b *Bucket) StartMultipart(ctx context.Context, key string, opts bucket.PutOptions) (string, error) {
	id, err := b.core().NewMultipartUpload(ctx, b.name, b.prefix+key, minio.PutObjectOptions{ContentType: opts.ContentType, ContentEncoding: opts.ContentEncoding})
	if err != nil {
		return "", fmt.Errorf("start multipart upload of %s: %w", key, b.classify(err, false))
	}
	return id, nil
}

// ListParts implements bucket.Multipart.
func (b *Bucket) ListParts(ctx context.Context, key, uploadID string) ([]bucket.Part, error) {
	var parts []bucket.Part
	marker := 0
	for {
		res, err := b.core().ListObjectParts(ctx, b.name, b.prefix+key, uploadID, marker, 1000)
		if err != nil {
			var resp minio.ErrorResponse
			if errors.As(err, &resp) && resp.Code == "NoSuchUpload" {
				return nil, fmt.Errorf("upload %s of %s: %w", uploadID, key, bucket.ErrNotExist)
			}
			return nil, fmt.Errorf("list parts of %s: %w", key, b.classify(err, false))
		}
		for _, p := range res.ObjectParts {
			parts = append(parts, bucket.Part{Number: p.PartNumber, ETag: strings.Trim(p.ETag, `"`), Size: p.Size})
		}
		if !res.IsTruncated {
			return parts, nil
		}
		marker = res.NextPartNumberMarker
	}
}

// PutPart implements bucket.Multipart. A given MD5 is sent as Content-MD5,
// so the server rejects a part that arrives damaged.
func (b *Bucket) PutPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64, md5sum []byte) (bucket.Part, error) {
	var opts minio.PutObjectPartOptions
	if md5sum != nil {
		opts.Md5Base64 = base64.StdEncoding.EncodeToString(md5sum)
	}
	p, err := b.core().PutObjectPart(ctx, b.name, b.prefix+key, uploadID, number, r, size, opts)
	if err != nil {
		return bucket.Part{}, fmt.Errorf("put part %d of %s: %w", number, key, b.classify(err, false))
	}
	return bucket.Part{Number: number, ETag: strings.Trim(p.ETag, `"`), Size: size}, nil
}

// CompleteMultipart implements bucket.Multipart.
func (b *Bucket) CompleteMultipart(ctx context.Context, key, uploadID string, parts []bucket.Part) error {
	cp := make([]minio.CompletePart, len(parts))
	for i, p := range parts {
		cp[i] = minio.CompletePart{PartNumber: p.Number, ETag: p.ETag}
	}
	if _, err := b.core().CompleteMultipartUpload(ctx, b.name, b.prefix+key, uploadID, cp, minio.PutObjectOptions{}); err != nil {
		return fmt.Errorf("complete upload of %s: %w", key, b.classify(err, false))
	}
	return nil
}

// AbortMultipart implements bucket.Multipart.
func (b *Bucket) AbortMultipart(ctx context.Context, key, uploadID string) error {
	if err := b.core().AbortMultipartUpload(ctx, b.name, b.prefix+key, uploadID); err != nil {
		var resp minio.ErrorResponse
		if errors.As(err, &resp) && resp.Code == "NoSuchUpload" {
			return nil
		}
		return fmt.Errorf("abort upload of %s: %w", key, b.classify(err, false))
	}
	return nil
}

// AbortStaleUploads aborts multipart uploads under prefix that were started
// more than olderThan ago: leftovers of crashes that no agent will resume.
// Younger ones may belong to another machine's agent still uploading.
func (b *Bucket) AbortStaleUploads(ctx context.Context, prefix string, olderThan time.Duration) (int, error) {
	n := 0
	for u := range b.client.ListIncompleteUploads(ctx, b.name, b.prefix+prefix, true) {
		if u.Err != nil {
			return n, b.classify(u.Err, false)
		}
		if time.Since(u.Initiated) < olderThan {
			continue
		}
		if err := b.core().AbortMultipartUpload(ctx, b.name, u.Key, u.UploadID); err != nil {
			return n, b.classify(err, false)
		}
		n++
	}
	return n, nil
}

// permanentCodes are S3 error codes that retrying cannot fix.
var permanentCodes = map[string]bool{
	"AccessDenied":          true,
	"AllAccessDisabled":     true,
	"InvalidAccessKeyId":    true,
	"SignatureDoesNotMatch": true,
	"NoSuchBucket":          true,
	"InvalidBucketName":     true,
	"AccountProblem":        true,
	"InvalidRange":          true,
	"MethodNotAllowed":      true,
}

// throttleCodes are S3 error codes that mean "slow down".
var throttleCodes = map[string]bool{
	"SlowDown":                   true,
	"Throttling":                 true,
	"ThrottlingException":        true,
	"RequestLimitExceeded":       true,
	"TooManyRequests":            true,
	"ServiceUnavailable":         true,
	"InternalError":              true,
	"RequestTimeout":             true,
	"XMinioServerNotInitialized": true,
}

// classify maps a minio-go error to the bucket package's error classes by
// its S3 error code or HTTP status (never by message text). For reads, 404
// and 403 both mean "not there": buckets without ListBucket permission
// answer 403 for a missing key, as Nix itself assumes.
func (b *Bucket) classify(err error, read bool) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var resp minio.ErrorResponse
	if !errors.As(err, &resp) {
		// No S3 answer at all: connection refused or reset, DNS, TLS.
		return fmt.Errorf("%w: %w", bucket.ErrUnavailable, err)
	}
	switch {
	case resp.Code == "NoSuchKey" || (read && resp.StatusCode == http.StatusNotFound && resp.Code != "NoSuchBucket"):
		return fmt.Errorf("%w (%s)", bucket.ErrNotExist, resp.Code)
	case read && resp.StatusCode == http.StatusForbidden && resp.Code != "InvalidAccessKeyId" && resp.Code != "SignatureDoesNotMatch":
		return fmt.Errorf("%w (403 %s)", bucket.ErrNotExist, resp.Code)
	case permanentCodes[resp.Code]:
		return fmt.Errorf("%w: %s: %s", bucket.ErrPermanent, resp.Code, resp.Message)
	case throttleCodes[resp.Code] || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		err = fmt.Errorf("%w: %w", bucket.ErrUnavailable, err)
		if d := b.hints.retryAfter(); d > 0 {
			return &bucket.RetryAfterError{Err: err, After: d}
		}
		return err
	}
	return err
}

// retryAfterTransport remembers the latest Retry-After a server sent with a
// 429 or 503, which minio-go's errors do not carry.
type retryAfterTransport struct {
	base  http.RoundTripper
	until atomic.Int64 // unix nanoseconds
}

func (t *retryAfterTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err == nil && (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable) {
		if d := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); d > 0 {
			t.until.Store(time.Now().Add(d).UnixNano())
		}
	}
	return resp, err
}

func (t *retryAfterTransport) retryAfter() time.Duration {
	return time.Until(time.Unix(0, t.until.Load()))
}

// parseRetryAfter reads a Retry-After value (seconds or an HTTP date),
// capped at one hour.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	var d time.Duration
	if secs, err := strconv.Atoi(v); err == nil {
		d = time.Duration(secs) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), time.Hour)
}
