package s3

import (
	"errors"
	"strings"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/nixspool/nixspool/internal/bucket"
)

// TestClassify: configuration errors that retrying cannot fix are permanent
// and say what to change; clock skew, expired tokens and damaged bodies
// stay transient without pausing the bucket; throttling and 5xx pause it;
// a refused create-only write is a precondition failure.
func TestClassify(t *testing.T) {
	b := &Bucket{hints: &retryAfterTransport{}}
	type want struct {
		permanent, unavailable, throttled, precondition, notExist bool
		hint                                                      string
	}
	for _, c := range []struct {
		code   string
		status int
		read   bool
		want   want
	}{
		{"AuthorizationHeaderMalformed", 400, false, want{permanent: true, hint: "region="}},
		{"PermanentRedirect", 301, false, want{permanent: true, hint: "region="}},
		{"InvalidArgument", 400, false, want{permanent: true, hint: "storage-class="}},
		{"InvalidRequest", 400, false, want{permanent: true, hint: "addressing-style="}},
		{"NotImplemented", 501, false, want{permanent: true, hint: "does not support"}},
		{"EntityTooLarge", 400, false, want{permanent: true, hint: "--max-nar-size"}},
		{"InvalidStorageClass", 400, false, want{permanent: true, hint: "storage-class="}},
		{"AccessDenied", 403, false, want{permanent: true, hint: "s3:PutObject"}},
		{"NoSuchBucket", 404, false, want{permanent: true, hint: "create it"}},
		{"InvalidAccessKeyId", 403, true, want{permanent: true, hint: "credentials"}},
		{"RequestTimeTooSkewed", 403, false, want{hint: "NTP"}},
		{"ExpiredToken", 400, false, want{hint: "refreshed"}},
		{"BadDigest", 400, false, want{}},
		{"XAmzContentSHA256Mismatch", 400, false, want{}},
		{"SlowDown", 503, false, want{unavailable: true, throttled: true}},
		{"", 429, false, want{unavailable: true, throttled: true}},
		{"InternalError", 500, false, want{unavailable: true}},
		{"ServiceUnavailable", 503, false, want{unavailable: true}},
		{"PreconditionFailed", 412, false, want{precondition: true}},
		{"NoSuchKey", 404, true, want{notExist: true}},
		{"AccessDenied", 403, true, want{notExist: true}}, // a missing key without ListBucket
		{"400 Bad Request", 400, true, want{}},            // a HEAD's bodiless answer: no reason given
	} {
		err := b.classify(minio.ErrorResponse{Code: c.code, StatusCode: c.status, Message: "msg"}, c.read)
		got := want{
			permanent:    bucket.IsPermanent(err),
			unavailable:  errors.Is(err, bucket.ErrUnavailable),
			throttled:    bucket.IsThrottled(err),
			precondition: bucket.IsPrecondition(err),
			notExist:     bucket.IsNotExist(err),
		}
		if c.want.hint != "" && !strings.Contains(err.Error(), c.want.hint) {
			t.Errorf("%s (%d): %q lacks the hint %q", c.code, c.status, err, c.want.hint)
		}
		got.hint = c.want.hint
		if got != c.want {
			t.Errorf("%s (%d, read=%v) = %v: %+v, want %+v", c.code, c.status, c.read, err, got, c.want)
		}
	}
	// No answer at all: the bucket is unavailable.
	if err := b.classify(errors.New("dial tcp: connection refused"), false); !errors.Is(err, bucket.ErrUnavailable) {
		t.Errorf("network error = %v", err)
	}
}
