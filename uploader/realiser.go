package uploader

import (
	"context"

	"github.com/nixspool/nixspool/nixstore"
)

// Realiser supplies the objects to write right after a path's narinfo:
// the realisations of the derivation outputs the path realises, in an
// order where every realisation comes after those it depends on.
type Realiser interface {
	For(ctx context.Context, info *nixstore.PathInfo) ([]Extra, error)
}

// Extra is one object written after a narinfo.
type Extra struct {
	Key, ContentType string
	Body             []byte
}
