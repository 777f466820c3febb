package cachegc

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/nixspool/nixspool/cachefmt"
	"github.com/nixspool/nixspool/internal/bucket"
	"github.com/nixspool/nixspool/storepath"
)

// A pin is a named root stored in the bucket: nixspool/pins/<name> holds
// one store path, and the collector keeps that path and its closure until
// the pin is removed. Writing a pin relies on the path's narinfo like a
// narinfo relies on its references, so agents write pins only after their
// Watcher's Check allows it.

var pinNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$`)

func validPinName(n string) bool { return pinNameRE.MatchString(n) }

// ErrNoPin is returned for a pin that does not exist.
var ErrNoPin = errors.New("no such pin")

// Pin is one pin.
type Pin struct {
	Name    string    `json:"name"`
	Path    string    `json:"path"`
	Written time.Time `json:"written"`
}

// PinKey returns the key of the pin name, or an error for a name that is
// not 1 to 100 letters, digits, '.', '_', '+' or '-' (starting with a
// letter or digit).
func PinKey(name string) (string, error) {
	if !validPinName(name) {
		return "", fmt.Errorf("pin name %q: want 1 to 100 letters, digits, '.', '_', '+' or '-', starting with a letter or digit", name)
	}
	return cachefmt.Keys.Pin(name), nil
}

// WritePin points the pin name at path (a new pin, or a moved one).
func WritePin(ctx context.Context, b bucket.Bucket, name, path string) error {
	key, err := PinKey(name)
	if err != nil {
		return err
	}
	if err := storepath.Check(storepath.DefaultStoreDir, path); err != nil {
		return err
	}
	body := path + "\n"
	if _, err := b.Put(ctx, key, strings.NewReader(body), int64(len(body)), bucket.PutOptions{ContentType: "text/plain"}); err != nil {
		return fmt.Errorf("write pin %s: %w", name, err)
	}
	return nil
}

// RemovePin removes the pin name and returns the path it held.
func RemovePin(ctx context.Context, b bucket.Bucket, name string) (string, error) {
	key, err := PinKey(name)
	if err != nil {
		return "", err
	}
	data, _, err := b.Get(ctx, key, 4096)
	if bucket.IsNotExist(err) {
		return "", fmt.Errorf("%w: %s", ErrNoPin, name)
	}
	if err != nil {
		return "", fmt.Errorf("read pin %s: %w", name, err)
	}
	if err := b.Delete(ctx, key); err != nil {
		return "", fmt.Errorf("remove pin %s: %w", name, err)
	}
	return strings.TrimSpace(string(data)), nil
}

// ListPins returns every pin, by name.
func ListPins(ctx context.Context, b bucket.Bucket) ([]Pin, error) {
	if err := bucket.CheckListable(b); err != nil {
		return nil, fmt.Errorf("pins: %w", err)
	}
	var objs []bucket.Object
	if err := b.List(ctx, bucket.ListOptions{Prefix: PinPrefix, Recursive: true}, func(o bucket.Object) error {
		if validPinName(pinName(o.Key)) {
			objs = append(objs, o)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("list pins: %w", err)
	}
	pins := []Pin{}
	for _, o := range objs {
		info, err := readPin(ctx, b, o.Key)
		if bucket.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read pin %s: %w", o.Key, err)
		}
		pins = append(pins, Pin{Name: pinName(o.Key), Path: info.Path, Written: o.LastModified})
	}
	sort.Slice(pins, func(i, j int) bool { return pins[i].Name < pins[j].Name })
	return pins, nil
}

// pinName is the name of the pin at key.
func pinName(key string) string {
	name, _ := cachefmt.Keys.PinName(key)
	return name
}
