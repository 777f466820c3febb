// Package file is a bucket.Bucket in a local directory: each key is a file
// below the root, written atomically (temp file, fsync, rename, fsync dir).
package file

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/nixspool/nixspool/atomicfile"
	"github.com/nixspool/nixspool/bucket"
)

// Bucket is a directory-backed bucket.
type Bucket struct {
	root string
}

var _ bucket.Bucket = (*Bucket)(nil)

// New returns a bucket rooted at dir, creating it if needed, and removes
// temp files that a crash left behind.
func New(dir string) (*Bucket, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("file cache %s: %w", dir, err)
	}
	b := &Bucket{root: dir}
	b.removeTemps()
	return b, nil
}

func (b *Bucket) String() string { return "file://" + b.root }

func (b *Bucket) path(key string) (string, error) {
	if key == "" || strings.HasPrefix(key, "/") || filepath.Clean(key) != key || strings.HasPrefix(key, "..") {
		return "", fmt.Errorf("invalid key %q", key)
	}
	return filepath.Join(b.root, key), nil
}

// Stat implements bucket.Bucket.
func (b *Bucket) Stat(ctx context.Context, key string) (bucket.Info, error) {
	p, err := b.path(key)
	if err != nil {
		return bucket.Info{}, err
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return bucket.Info{}, fmt.Errorf("stat %s: %w", key, bucket.ErrNotExist)
	}
	if err != nil {
		return bucket.Info{}, err
	}
	return bucket.Info{Size: fi.Size()}, nil
}

// Put implements bucket.Bucket.
func (b *Bucket) Put(ctx context.Context, key string, r io.Reader, size int64, _ bucket.PutOptions) error {
	p, err := b.path(key)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	if err := atomicfile.Write(p, &ctxReader{ctx: ctx, r: r}, size, 0o644); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// Get implements bucket.Bucket.
func (b *Bucket) Get(ctx context.Context, key string, max int64) ([]byte, error) {
	p, err := b.path(key)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("get %s: %w", key, bucket.ErrNotExist)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("get %s: larger than %d bytes", key, max)
	}
	return data, nil
}

// Delete implements bucket.Bucket.
func (b *Bucket) Delete(ctx context.Context, key string) error {
	p, err := b.path(key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (b *Bucket) removeTemps() {
	filepath.WalkDir(b.root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), atomicfile.TempPrefix) {
			os.Remove(p)
		}
		return nil
	})
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
