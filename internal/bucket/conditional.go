package bucket

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// ProbeConditional finds out whether b honours create-only writes
// (IfNoneMatch): it writes a fresh probe key twice and expects the second
// write to be refused. Some S3 implementations ignore the header and
// overwrite; callers then fall back to looking before writing, and say so.
// The probe object is deleted afterwards; keyPrefix names where it goes.
func ProbeConditional(ctx context.Context, b Bucket, keyPrefix string) (bool, error) {
	var rnd [8]byte
	rand.Read(rnd[:])
	key := keyPrefix + "conditional-" + hex.EncodeToString(rnd[:])
	body := "nixspool conditional-write probe\n"
	put := func() error {
		_, err := b.Put(ctx, key, strings.NewReader(body), int64(len(body)), PutOptions{ContentType: "text/plain", IfNoneMatch: true})
		return err
	}
	if err := put(); err != nil {
		if IsPrecondition(err) {
			return false, fmt.Errorf("conditional-write probe: a fresh key %s already exists", key)
		}
		if !IsPermanent(err) {
			return false, fmt.Errorf("conditional-write probe: %w", err)
		}
		// Refused outright (NotImplemented, InvalidArgument, 400): does a
		// plain write work? Then the store just does not know the header.
		if _, perr := b.Put(ctx, key, strings.NewReader(body), int64(len(body)), PutOptions{ContentType: "text/plain"}); perr != nil {
			return false, fmt.Errorf("conditional-write probe: %w", perr)
		}
		b.Delete(context.WithoutCancel(ctx), key)
		return false, nil
	}
	defer b.Delete(context.WithoutCancel(ctx), key)
	err := put()
	switch {
	case err == nil:
		return false, nil
	case IsPrecondition(err):
		return true, nil
	case IsPermanent(err):
		// Some stores reject the header outright (NotImplemented).
		return false, nil
	default:
		return false, fmt.Errorf("conditional-write probe: %w", err)
	}
}

// ErrIfMatchIgnored is wrapped by ProbeIfMatch's error when the store does
// not honour compare-and-swap writes.
var ErrIfMatchIgnored = errors.New("the store does not honour If-Match")

// ProbeIfMatch finds out whether b honours compare-and-swap writes
// (IfMatch): it writes a fresh probe key, then expects a write naming a
// wrong ETag to be refused with ErrPrecondition and one naming the ETag
// the first write returned to succeed. It returns nil if so, an error
// wrapping ErrIfMatchIgnored saying what went wrong if not, and another
// error if the probe could not be made. The probe object is deleted
// afterwards; keyPrefix names where it goes.
func ProbeIfMatch(ctx context.Context, b Bucket, keyPrefix string) error {
	var rnd [8]byte
	rand.Read(rnd[:])
	key := keyPrefix + "if-match-" + hex.EncodeToString(rnd[:])
	put := func(body, etag string) (Info, error) {
		return b.Put(ctx, key, strings.NewReader(body), int64(len(body)), PutOptions{ContentType: "text/plain", IfMatch: etag})
	}
	first, err := put("nixspool If-Match probe 1\n", "")
	if err != nil {
		return fmt.Errorf("If-Match probe: %w", err)
	}
	defer b.Delete(context.WithoutCancel(ctx), key)
	if first.ETag == "" {
		return fmt.Errorf("%w: a write returned no ETag to match", ErrIfMatchIgnored)
	}
	switch _, err := put("nixspool If-Match probe 2\n", "0123456789abcdef0123456789abcdef"); {
	case err == nil:
		return fmt.Errorf("%w: a write naming a wrong ETag replaced the object", ErrIfMatchIgnored)
	case IsPrecondition(err):
	case IsPermanent(err):
		// Refused outright (NotImplemented, InvalidArgument, 400).
		return fmt.Errorf("%w: a write naming an ETag was refused: %v", ErrIfMatchIgnored, err)
	default:
		return fmt.Errorf("If-Match probe: %w", err)
	}
	switch _, err := put("nixspool If-Match probe 3\n", first.ETag); {
	case err == nil:
		return nil
	case IsPrecondition(err):
		return fmt.Errorf("%w: a write naming the ETag the store had just returned was refused", ErrIfMatchIgnored)
	default:
		return fmt.Errorf("If-Match probe: %w", err)
	}
}
