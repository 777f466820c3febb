package s3

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/nixspool/nixspool/internal/bucket"
)

// onlyReader hides every method but Read.
type onlyReader struct{ io.Reader }

// TestHashedBody: a seekable body is used in place, rewound; any other
// is read into memory; both hash the same and refuse a wrong length.
func TestHashedBody(t *testing.T) {
	want := sha256.Sum256([]byte("hello"))
	for _, r := range []io.Reader{strings.NewReader("hello"), onlyReader{strings.NewReader("hello")}} {
		body, sum, err := hashedBody(r, 5)
		if err != nil || !bytes.Equal(sum, want[:]) {
			t.Fatalf("%T: %x, %v", r, sum, err)
		}
		if data, _ := io.ReadAll(body); string(data) != "hello" {
			t.Fatalf("%T: body %q", r, data)
		}
		if _, isSame := body.(*strings.Reader); isSame != (r == body) {
			t.Fatalf("%T: body %T", r, body)
		}
	}
	for _, size := range []int64{4, 6} {
		for _, r := range []io.Reader{strings.NewReader("hello"), onlyReader{strings.NewReader("hello")}} {
			if _, _, err := hashedBody(r, size); !errors.Is(err, bucket.ErrLocal) {
				t.Fatalf("%T with size %d: %v", r, size, err)
			}
		}
	}
}
