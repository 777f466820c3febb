// Package s3 is a bucket.Bucket on S3 or any S3-compatible server (MinIO,
// Garage, R2, …), through minio-go.
package s3

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"

	"github.com/nixspool/nixspool/cacheurl"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/internal/bucket/s3/awscreds"
)

// Bucket is an S3 bucket (with an optional key prefix).
type Bucket struct {
	client *minio.Client
	name   string
	prefix string
	desc   string
	hints  *retryAfterTransport
	creds  *credentials.Credentials
	chain  *awscreds.Chain

	storageClass string // applied to uploads that do not name one
	partFloor    uint64 // smallest multipart part
	threshold    int64  // below this size a known-size upload is one PUT
}

var _ bucket.Bucket = (*Bucket)(nil)

// MinPartSize is the default smallest multipart part size (the cache URL's
// multipart-chunk-size changes it); larger objects get larger parts so that
// no upload needs more than maxParts parts.
const (
	MinPartSize = 16 << 20
	maxParts    = 9000 // below S3's limit of 10,000, with headroom
)

// New connects to the bucket described by c. Credentials come from the
// AWS chain in Nix's order (package awscreds): the environment, SSO, the
// profile (profile=, else AWS_PROFILE, else default), web identity, ECS,
// IMDS. They never appear in c.
//
// Requests go where Nix sends them for the same URL: to BUCKET.ENDPOINT/KEY
// (virtual-host style) or ENDPOINT/BUCKET/KEY (path style) as c.VirtualHost
// says, ENDPOINT being s3.REGION.amazonaws.com without endpoint=. Nothing
// here asks about the bucket itself (existence, location): with an
// endpoint that already names a bucket (BUCKET.REGION.digitaloceanspaces.com)
// such questions fail although every object operation works.
func New(c *cacheurl.Cache) (*Bucket, error) {
	return newBucket(c, nil)
}

// newBucket is New; adjust, if set, changes the HTTP transport (tests point
// it at a capturing server).
func newBucket(c *cacheurl.Cache, adjust func(*http.Transport)) (*Bucket, error) {
	if err := s3utils.CheckValidBucketName(c.Bucket); err != nil {
		return nil, fmt.Errorf("cache URL: bucket %q: %w", c.Bucket, err)
	}
	chain := awscreds.NewChain(awscreds.Options{Profile: c.Profile, Region: c.Region})
	creds := credentials.New(chain)
	endpoint := c.Endpoint
	if endpoint == "" {
		endpoint = "s3." + c.Region + ".amazonaws.com"
	}
	lookup := minio.BucketLookupPath
	if c.VirtualHost {
		lookup = minio.BucketLookupDNS
	}
	tr, err := minio.DefaultTransport(c.Secure)
	if err != nil {
		return nil, err
	}
	tr.MaxIdleConnsPerHost = 64 // keep-alive for many small concurrent requests
	if c.TLSCertificate != "" {
		keyFile := c.TLSPrivateKey
		if keyFile == "" {
			keyFile = c.TLSCertificate
		}
		cert, err := tls.LoadX509KeyPair(c.TLSCertificate, keyFile)
		if err != nil {
			// The error names the files, never their contents.
			return nil, fmt.Errorf("tls-certificate: %w", err)
		}
		if tr.TLSClientConfig == nil {
			tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		tr.TLSClientConfig.Certificates = []tls.Certificate{cert}
	}
	if adjust != nil {
		adjust(tr)
	}
	hints := &retryAfterTransport{base: tr}
	client, err := minio.New(endpoint, &minio.Options{
		Creds:        creds,
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
	// The endpoints Nix uses (s3.REGION.amazonaws.com), not the dual-stack
	// ones: a firewall or VPC endpoint policy written for Nix applies.
	client.SetS3EnableDualstack(false)
	b := &Bucket{client: client, name: c.Bucket, prefix: c.Prefix, desc: c.String(), hints: hints, creds: creds, chain: chain,
		storageClass: c.StorageClass, partFloor: MinPartSize, threshold: c.MultipartThreshold}
	if c.PartSize > 0 {
		b.partFloor = c.PartSize
	}
	return b, nil
}

func (b *Bucket) String() string { return b.desc }

// CredentialSource names where the credentials come from ("environment
// (AWS_ACCESS_KEY_ID)", "profile ci (assume role … with profile base)",
// …), looking them up if no request has yet; never a secret.
func (b *Bucket) CredentialSource(ctx context.Context) string {
	if _, err := b.creds.GetWithContext(&credentials.CredContext{Client: http.DefaultClient, Context: ctx}); err != nil {
		return "error: " + err.Error()
	}
	return b.chain.Describe()
}

// PartSize returns the multipart part size for an object of size bytes:
// the floor (default MinPartSize), raised to whole MiB so that no upload
// needs more than 9,000 parts.
func (b *Bucket) PartSize(size int64) uint64 {
	return partSize(b.partFloor, size)
}

// PartSize is Bucket.PartSize with the default floor.
func PartSize(size int64) uint64 { return partSize(MinPartSize, size) }

func partSize(floor uint64, size int64) uint64 {
	ps := floor
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
	return infoOf(info), nil
}

func infoOf(o minio.ObjectInfo) bucket.Info {
	return bucket.Info{Size: o.Size, ETag: strings.Trim(o.ETag, `"`), LastModified: o.LastModified, ContentEncoding: o.Metadata.Get("Content-Encoding")}
}

// putOptions maps opts to minio-go's, with the cache's storage class unless
// opts names another.
func (b *Bucket) putOptions(opts bucket.PutOptions) minio.PutObjectOptions {
	po := minio.PutObjectOptions{ContentType: opts.ContentType, ContentEncoding: opts.ContentEncoding, StorageClass: opts.StorageClass}
	if po.StorageClass == "" {
		po.StorageClass = b.storageClass
	}
	if opts.IfNoneMatch {
		po.SetMatchETagExcept("*")
	}
	if opts.IfMatch != "" {
		po.SetMatchETag(opts.IfMatch)
	}
	return po
}

// Put implements bucket.Bucket. With a known size, an object larger than one
// part (and than the cache's multipart threshold, if it sets one) goes up
// as a multipart upload whose part size keeps the part count under S3's
// limit; the returned size is checked against what was meant to be sent. An error
// reading r is reported as bucket.ErrLocal, never as the bucket's fault.
func (b *Bucket) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	if size >= 0 && size <= smallObject {
		return b.putSmall(ctx, key, r, size, opts)
	}
	body, readErr := watchReads(r)
	po := b.putOptions(opts)
	po.PartSize = b.PartSize(size)
	po.NumThreads = 2
	var info minio.UploadInfo
	var err error
	switch {
	case size >= 0 && (uint64(size) < po.PartSize || size < b.threshold) && len(opts.SHA256) == sha256.Size:
		// One PUT request, signed with the caller's SHA-256: the body is
		// read once, as it is sent.
		info, err = b.core().PutObject(ctx, b.name, b.prefix+key, body, size, "", hex.EncodeToString(opts.SHA256), unframed(po, true))
	case size >= 0 && (uint64(size) < po.PartSize || size < b.threshold):
		po.DisableMultipart = true
		po = unframed(po, false) // one PUT request, its body read twice (Content-MD5, then the send)
		info, err = b.client.PutObject(ctx, b.name, b.prefix+key, body, size, po)
	default:
		info, err = b.client.PutObject(ctx, b.name, b.prefix+key, body, size, po)
	}
	if err != nil {
		if rerr := readErr(); rerr != nil {
			return bucket.Info{}, fmt.Errorf("put %s: read body: %w: %w", key, bucket.ErrLocal, rerr)
		}
		return bucket.Info{}, fmt.Errorf("put %s: %w", key, b.classify(err, false))
	}
	if size >= 0 && info.Size != size {
		return bucket.Info{}, fmt.Errorf("put %s: server stored %d bytes, want %d", key, info.Size, size)
	}
	return bucket.Info{Size: info.Size, ETag: strings.Trim(info.ETag, `"`), LastModified: info.LastModified}, nil
}

// smallObject is the size up to which an object is read into memory and
// sent with its SHA-256 in the signature. minio-go would otherwise use
// chunked streaming signatures, whose per-chunk signing costs the server
// (and us) more than the object itself for narinfos and tiny NARs.
const smallObject = 1 << 20

// unframed makes a single-request PUT go without minio-go's aws-chunked
// streaming signature, which it uses over plain http and declares as
// "Content-Encoding: aws-chunked[,<ours>]". S3 and MinIO drop that token
// from the object's metadata, but some servers (versitygw up to 1.8.0,
// versity/versitygw#2398) keep the header as it came and serve it back, and
// stock Nix then fails with "input compression not recognized". The body is
// protected instead by its SHA-256 in the signature when the caller passes
// it (sha256Known), else by Content-MD5, which minio-go computes (reading a
// seekable body twice, buffering another one). Multipart parts may still be
// streamed: an object's metadata comes from the request that starts its
// upload, which has no body.
func unframed(po minio.PutObjectOptions, sha256Known bool) minio.PutObjectOptions {
	po.DisableContentSha256 = true
	po.SendContentMd5 = !sha256Known
	return po
}

func (b *Bucket) putSmall(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	body, readErr, sum := r, func() error { return nil }, opts.SHA256
	if len(sum) == sha256.Size {
		body, readErr = watchReads(r)
	} else {
		var err error
		if body, sum, err = hashedBody(r, size); err != nil {
			return bucket.Info{}, fmt.Errorf("put %s: %w", key, err)
		}
	}
	info, err := b.core().PutObject(ctx, b.name, b.prefix+key, body, size, "", hex.EncodeToString(sum), unframed(b.putOptions(opts), true))
	if err != nil {
		if rerr := readErr(); rerr != nil {
			return bucket.Info{}, fmt.Errorf("put %s: read body: %w: %w", key, bucket.ErrLocal, rerr)
		}
		return bucket.Info{}, fmt.Errorf("put %s: %w", key, b.classify(err, false))
	}
	if info.Size != size {
		return bucket.Info{}, fmt.Errorf("put %s: server stored %d bytes, want %d", key, info.Size, size)
	}
	return bucket.Info{Size: info.Size, ETag: strings.Trim(info.ETag, `"`), LastModified: info.LastModified}, nil
}

// hashedBody returns a body of exactly size bytes read from r and its
// SHA-256. A seekable r (the bytes a caller holds) is hashed in place and
// rewound, not copied.
func hashedBody(r io.Reader, size int64) (io.Reader, []byte, error) {
	h := sha256.New()
	// A retry of the S3 client seeks the body to 0: only a body that
	// starts there is used in place.
	if rs, ok := r.(io.ReadSeeker); ok {
		if start, err := rs.Seek(0, io.SeekCurrent); err == nil && start == 0 {
			n, err := io.Copy(h, io.LimitReader(rs, size+1))
			switch {
			case err != nil:
				return nil, nil, fmt.Errorf("read body: %w: %w", bucket.ErrLocal, err)
			case n != size:
				return nil, nil, fmt.Errorf("%w: body has %d bytes, want %d", bucket.ErrLocal, n, size)
			}
			if _, err := rs.Seek(0, io.SeekStart); err != nil {
				return nil, nil, fmt.Errorf("rewind body: %w: %w", bucket.ErrLocal, err)
			}
			return rs, h.Sum(nil), nil
		}
	}
	data := make([]byte, size)
	if _, err := io.ReadFull(r, data); err != nil {
		return nil, nil, fmt.Errorf("read body: %w: %w", bucket.ErrLocal, err)
	}
	if n, _ := r.Read(make([]byte, 1)); n > 0 {
		return nil, nil, fmt.Errorf("%w: body longer than %d bytes", bucket.ErrLocal, size)
	}
	h.Write(data)
	return bytes.NewReader(data), h.Sum(nil), nil
}

// Get implements bucket.Bucket.
func (b *Bucket) Get(ctx context.Context, key string, max int64) ([]byte, bucket.Info, error) {
	rc, info, err := b.Open(ctx, key, 0, -1)
	if err != nil {
		return nil, bucket.Info{}, err
	}
	defer rc.Close()
	if info.Size > max {
		return nil, bucket.Info{}, fmt.Errorf("get %s: larger than %d bytes", key, max)
	}
	data, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return nil, bucket.Info{}, fmt.Errorf("get %s: %w", key, b.classify(err, true))
	}
	if int64(len(data)) > max {
		return nil, bucket.Info{}, fmt.Errorf("get %s: larger than %d bytes", key, max)
	}
	return data, info, nil
}

// Open implements bucket.Bucket: one GET (ranged unless the whole object
// is wanted), whose answer is checked before Open returns.
func (b *Bucket) Open(ctx context.Context, key string, offset, length int64) (io.ReadCloser, bucket.Info, error) {
	var opts minio.GetObjectOptions
	if offset > 0 || length >= 0 {
		end := int64(0)
		if length >= 0 {
			if length == 0 {
				return io.NopCloser(bytes.NewReader(nil)), bucket.Info{}, nil
			}
			end = offset + length - 1
		}
		if err := opts.SetRange(offset, end); err != nil {
			return nil, bucket.Info{}, fmt.Errorf("get %s: %w", key, err)
		}
	}
	rc, oi, h, err := b.core().GetObject(ctx, b.name, b.prefix+key, opts)
	if err != nil {
		return nil, bucket.Info{}, fmt.Errorf("get %s: %w", key, b.classify(err, true))
	}
	info := infoOf(oi)
	// A ranged answer's Content-Length is the range's; the object's size
	// follows the slash of Content-Range ("bytes 0-15/12345").
	if cr := h.Get("Content-Range"); cr != "" {
		if _, total, ok := strings.Cut(cr, "/"); ok {
			if n, err := strconv.ParseInt(total, 10, 64); err == nil {
				info.Size = n
			}
		}
	}
	return rc, info, nil
}

// Delete implements bucket.Bucket.
func (b *Bucket) Delete(ctx context.Context, key string) error {
	if err := b.client.RemoveObject(ctx, b.name, b.prefix+key, minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("delete %s: %w", key, b.classify(err, false))
	}
	return nil
}

var _ bucket.BatchDeleter = (*Bucket)(nil)

// DeleteMany implements bucket.BatchDeleter with S3's multi-object delete
// (up to 1,000 keys a request).
func (b *Bucket) DeleteMany(ctx context.Context, keys []string) error {
	ch := make(chan minio.ObjectInfo, len(keys))
	for _, k := range keys {
		ch <- minio.ObjectInfo{Key: b.prefix + k}
	}
	close(ch)
	var first error
	for e := range b.client.RemoveObjects(ctx, b.name, ch, minio.RemoveObjectsOptions{}) {
		if e.Err != nil && first == nil {
			first = fmt.Errorf("delete %s: %w", strings.TrimPrefix(e.ObjectName, b.prefix), b.classify(e.Err, false))
		}
	}
	return first
}

// List implements bucket.Bucket (ListObjectsV2, 1,000 keys a request).
func (b *Bucket) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lo := minio.ListObjectsOptions{Prefix: b.prefix + opts.Prefix, Recursive: opts.Recursive}
	if opts.StartAfter != "" {
		lo.StartAfter = b.prefix + opts.StartAfter
	}
	for o := range b.client.ListObjects(ctx, b.name, lo) {
		if o.Err != nil {
			return fmt.Errorf("list %q: %w", opts.Prefix, b.classify(o.Err, false))
		}
		if strings.HasSuffix(o.Key, "/") {
			continue // a common prefix ("directory") of a non-recursive listing
		}
		if err := fn(bucket.Object{Key: strings.TrimPrefix(o.Key, b.prefix), Info: infoOf(o)}); err != nil {
			return err
		}
	}
	return ctx.Err()
}

var _ bucket.Multipart = (*Bucket)(nil)

func (b *Bucket) core() minio.Core { return minio.Core{Client: b.client} }

// StartMultipart implements bucket.Multipart.
func (b *Bucket) StartMultipart(ctx context.Context, key string, opts bucket.PutOptions) (string, error) {
	id, err := b.core().NewMultipartUpload(ctx, b.name, b.prefix+key, b.putOptions(opts))
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
	body, readErr := watchReads(r)
	p, err := b.core().PutObjectPart(ctx, b.name, b.prefix+key, uploadID, number, body, size, opts)
	if err != nil {
		if rerr := readErr(); rerr != nil {
			return bucket.Part{}, fmt.Errorf("put part %d of %s: read body: %w: %w", number, key, bucket.ErrLocal, rerr)
		}
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

// ListUploads implements bucket.Multipart. Keys are returned relative to
// the cache's prefix, like every other key.
func (b *Bucket) ListUploads(ctx context.Context, prefix string) ([]bucket.Upload, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var out []bucket.Upload
	for u := range b.client.ListIncompleteUploads(ctx, b.name, b.prefix+prefix, true) {
		if u.Err != nil {
			return out, fmt.Errorf("list multipart uploads: %w", b.classify(u.Err, false))
		}
		out = append(out, bucket.Upload{Key: strings.TrimPrefix(u.Key, b.prefix), UploadID: u.UploadID, Initiated: u.Initiated})
	}
	return out, nil
}

// watchReads wraps r so that an error reading it can be told apart from the
// store's errors afterwards. The wrapper keeps io.ReaderAt and io.Seeker
// when r has them, so that minio-go still uploads parts from the file
// instead of buffering them.
func watchReads(r io.Reader) (io.Reader, func() error) {
	var mu sync.Mutex
	var first error
	note := func(err error) {
		if err != nil && err != io.EOF {
			mu.Lock()
			if first == nil {
				first = err
			}
			mu.Unlock()
		}
	}
	get := func() error {
		mu.Lock()
		defer mu.Unlock()
		return first
	}
	if f, ok := r.(fileLike); ok {
		return &watchedFile{f: f, note: note}, get
	}
	return &watchedReader{r: r, note: note}, get
}

type fileLike interface {
	io.Reader
	io.ReaderAt
	io.Seeker
}

type watchedReader struct {
	r    io.Reader
	note func(error)
}

func (w *watchedReader) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	w.note(err)
	return n, err
}

type watchedFile struct {
	f    fileLike
	note func(error)
}

func (w *watchedFile) Read(p []byte) (int, error) {
	n, err := w.f.Read(p)
	w.note(err)
	return n, err
}

func (w *watchedFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := w.f.ReadAt(p, off)
	w.note(err)
	return n, err
}

func (w *watchedFile) Seek(off int64, whence int) (int64, error) { return w.f.Seek(off, whence) }

// permanentCodes are S3 error codes that retrying cannot fix, each with what
// to change. Codes not listed and not throttling are transient.
var permanentCodes = map[string]string{
	"AccessDenied":                       "the credentials are valid but lack permission: the policy must allow s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on the bucket",
	"AllAccessDisabled":                  "all access to this bucket has been disabled by its owner",
	"InvalidAccessKeyId":                 "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile=, the credentials file)",
	"SignatureDoesNotMatch":              "check the secret key, and that region= matches what the store expects",
	"NoSuchBucket":                       "the bucket does not exist: create it, or fix the bucket name in the cache URL",
	"InvalidBucketName":                  "the bucket name is not valid for this store",
	"AccountProblem":                     "the store reports a problem with the account",
	"MethodNotAllowed":                   "the store does not allow this operation on the bucket",
	"AuthorizationHeaderMalformed":       "the region is wrong: set region= in the cache URL to the bucket's region (the store's message names it)",
	"PermanentRedirect":                  "the bucket lives in another region or behind another endpoint: set region= (and endpoint=) in the cache URL",
	"IllegalLocationConstraintException": "the bucket lives in another region: set region= in the cache URL",
	"InvalidArgument":                    "the store rejected a request parameter: check storage-class=, addressing-style= and endpoint= in the cache URL",
	"InvalidRequest":                     "the store rejected the request: check addressing-style=, endpoint= and scheme= in the cache URL",
	"NotImplemented":                     "this S3 implementation does not support a feature used here; check the cache URL parameters (storage-class=, multipart-*)",
	"EntityTooLarge":                     "the object is larger than the store accepts: exclude such paths (--max-nar-size) or raise the store's limit",
	"EntityTooSmall":                     "the store rejected a multipart part as too small: raise multipart-chunk-size=",
	"InvalidStorageClass":                "storage-class= names a class this store does not offer",
	"MalformedXML":                       "the store could not parse a request; it may not support this operation",
	"KeyTooLongError":                    "the object key is too long for this store (a long prefix in the cache URL?)",
	"MissingContentLength":               "the store requires a content length (a proxy in between may strip it)",
	"InvalidDigest":                      "the store rejected a Content-MD5 header",
	// versitygw without an IAM service answers an unknown access key with
	// this code and 404 instead of InvalidAccessKeyId and 403.
	"XAdminUserNotFound": "the store knows no such access key: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile=, the credentials file)",
	// File-backed stores (versitygw's posix backend) cannot hold both an
	// object "a" and an object "a/b" (409). nixspool's own keys never
	// collide so; a key prefix in the cache URL that names an existing
	// object can.
	"ObjectParentIsFile":        "an object in the bucket has the name of this key's directory: check the key prefix in the cache URL",
	"ExistingObjectIsDirectory": "objects in the bucket are stored under this key as a directory: check the key prefix in the cache URL",
}

// transientCodes are errors of this request (or of this moment) that a
// retry of the same job can fix, and which say nothing about the bucket's
// health: clock skew, credentials about to be refreshed, bytes damaged in
// transit.
var transientCodes = map[string]string{
	"RequestTimeTooSkewed":       "this machine's clock differs from the store's by more than 15 minutes: check NTP",
	"ExpiredToken":               "temporary credentials expired; they are refreshed on the next attempt",
	"TokenRefreshRequired":       "temporary credentials must be refreshed",
	"BadDigest":                  "",
	"XAmzContentSHA256Mismatch":  "",
	"IncompleteBody":             "",
	"RequestTimeout":             "",
	"ConditionalRequestConflict": "",
	"OperationAborted":           "",
}

// throttleCodes are S3 error codes that mean "slow down".
var throttleCodes = map[string]bool{
	"SlowDown":             true,
	"SlowDownWrite":        true,
	"SlowDownRead":         true,
	"Throttling":           true,
	"ThrottlingException":  true,
	"RequestLimitExceeded": true,
	"TooManyRequests":      true,
}

// unavailableCodes are S3 error codes that mean the service is down.
var unavailableCodes = map[string]bool{
	"ServiceUnavailable":         true,
	"InternalError":              true,
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
	if hint, ok := transientCodes[resp.Code]; ok {
		if hint != "" {
			return fmt.Errorf("%s: %s (hint: %s)", resp.Code, resp.Message, hint)
		}
		return err
	}
	switch {
	case resp.Code == "NoSuchKey" || (read && resp.StatusCode == http.StatusNotFound && resp.Code != "NoSuchBucket"):
		return fmt.Errorf("%w (%s)", bucket.ErrNotExist, resp.Code)
	case read && resp.StatusCode == http.StatusForbidden && resp.Code != "InvalidAccessKeyId" && resp.Code != "SignatureDoesNotMatch" && resp.Code != "AllAccessDisabled":
		return fmt.Errorf("%w (403 %s)", bucket.ErrNotExist, resp.Code)
	case resp.Code == "PreconditionFailed" || resp.StatusCode == http.StatusPreconditionFailed:
		return fmt.Errorf("%w (%s)", bucket.ErrPrecondition, resp.Code)
	case permanentCodes[resp.Code] != "":
		return &bucket.HintError{Err: fmt.Errorf("%w: %s: %s", bucket.ErrPermanent, resp.Code, resp.Message), Hint: permanentCodes[resp.Code]}
	case throttleCodes[resp.Code] || resp.StatusCode == http.StatusTooManyRequests:
		return b.withRetryAfter(fmt.Errorf("%w: %w: %w", bucket.ErrUnavailable, bucket.ErrThrottled, err))
	case unavailableCodes[resp.Code] || resp.StatusCode >= 500:
		return b.withRetryAfter(fmt.Errorf("%w: %w", bucket.ErrUnavailable, err))
	case read && strings.Contains(resp.Code, " "):
		// An answer without a body (a HEAD): minio-go made the code up
		// from the status line, so nothing says why (an expired token, a
		// skewed clock, …). Transient: the next attempt may say more.
		return err
	case resp.StatusCode == http.StatusBadRequest || resp.StatusCode == http.StatusMethodNotAllowed || resp.StatusCode == http.StatusNotImplemented:
		return fmt.Errorf("%w: %s: %s", bucket.ErrPermanent, resp.Code, resp.Message)
	}
	return err
}

func (b *Bucket) withRetryAfter(err error) error {
	if d := b.hints.retryAfter(); d > 0 {
		return &bucket.RetryAfterError{Err: err, After: d}
	}
	return err
}

// retryAfterTransport remembers the latest Retry-After a server sent with a
// 429 or 503, which minio-go's errors do not carry, and estimates the
// server's clock from the Date headers of its answers.
type retryAfterTransport struct {
	base  http.RoundTripper
	until atomic.Int64 // unix nanoseconds
	clock storeClock
	// onThrottle, if set, is called for every 429/503 answer, including
	// those minio-go retries by itself.
	onThrottle atomic.Pointer[func()]
}

// OnThrottle sets f to be called whenever the store answers 429 or 503
// (an adaptive window shrinks on it).
func (b *Bucket) OnThrottle(f func()) { b.hints.onThrottle.Store(&f) }

func (t *retryAfterTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	sent := time.Now()
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	if d, perr := http.ParseTime(resp.Header.Get("Date")); perr == nil && bodiless(req) {
		t.clock.observe(sent, time.Now(), d)
	}
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		if d := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); d > 0 {
			t.until.Store(time.Now().Add(d).UnixNano())
		}
		if f := t.onThrottle.Load(); f != nil {
			(*f)()
		}
	}
	return resp, err
}

var _ bucket.BoundedClock = (*Bucket)(nil)

// Now implements bucket.Clock: the local time corrected by the offset of
// the server's clock measured best in recent answers (NowWithin says how
// well).
func (b *Bucket) Now() time.Time {
	now, _ := b.NowWithin()
	return now
}

// NowWithin implements bucket.BoundedClock. Before any answer it returns
// the local time and bucket.UnknownClockBound.
func (b *Bucket) NowWithin() (time.Time, time.Duration) {
	now, bound, _ := b.hints.clock.estimate(time.Now())
	return now, bound
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
