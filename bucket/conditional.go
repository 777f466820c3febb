package bucket

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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
