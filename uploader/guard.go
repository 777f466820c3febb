package uploader

import "context"

// Guard tells the uploader which existing objects a garbage collector is
// about to delete (the gc package's Watcher implements it).
type Guard interface {
	// Check returns nil if a narinfo relying on the existing objects relied
	// (keys: the NAR, the narinfos of references) may be written now, or a
	// transient error if one of them is about to be deleted.
	Check(ctx context.Context, relied []string) error
	// Doomed reports whether the object at key is announced for deletion.
	Doomed(key string) bool
}
