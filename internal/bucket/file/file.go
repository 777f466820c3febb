// Package file is a bucket.Bucket in a local directory: each key is a file
// below the root, written atomically (temp file, fsync, rename, fsync dir).
//
// ETags name a version of a file (inode, modification time and size), so a
// rewrite of a key gets a new ETag; LastModified is the file's mtime.
// Create-only writes link the finished temp file into place, which fails if
// the name exists, so they are safe between processes; replace-if-match
// writes hold an flock on the directory's lock file.
package file

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/nixspool/nixspool/internal/atomicfile"
	"github.com/nixspool/nixspool/internal/bucket"
)

// lockName is the lock file for conditional replacements, in the root.
const lockName = ".nixspool-lock"

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
	if key == "" || strings.HasPrefix(key, "/") || filepath.Clean(key) != key || strings.HasPrefix(key, "..") || key == lockName {
		return "", fmt.Errorf("invalid key %q", key)
	}
	return filepath.Join(b.root, key), nil
}

func infoOf(fi os.FileInfo) bucket.Info {
	info := bucket.Info{Size: fi.Size(), LastModified: fi.ModTime()}
	var ino uint64
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		ino = st.Ino
	}
	info.ETag = fmt.Sprintf("%x-%x-%x", ino, fi.ModTime().UnixNano(), fi.Size())
	return info
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
	return infoOf(fi), nil
}

// Put implements bucket.Bucket.
func (b *Bucket) Put(ctx context.Context, key string, r io.Reader, size int64, opts bucket.PutOptions) (bucket.Info, error) {
	p, err := b.path(key)
	if err != nil {
		return bucket.Info{}, err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return bucket.Info{}, fmt.Errorf("put %s: %w", key, err)
	}
	body := &ctxReader{ctx: ctx, r: r}
	switch {
	case opts.IfNoneMatch:
		err = atomicfile.WriteNew(p, body, size, 0o644)
		if errors.Is(err, os.ErrExist) {
			return bucket.Info{}, fmt.Errorf("put %s: %w (exists)", key, bucket.ErrPrecondition)
		}
	case opts.IfMatch != "":
		err = b.replaceIfMatch(key, p, body, size, opts.IfMatch)
	default:
		err = atomicfile.Write(p, body, size, 0o644)
	}
	if err != nil {
		if bucket.IsPrecondition(err) {
			return bucket.Info{}, err
		}
		return bucket.Info{}, fmt.Errorf("put %s: %w", key, err)
	}
	return b.Stat(ctx, key)
}

func (b *Bucket) replaceIfMatch(key, p string, r io.Reader, size int64, etag string) error {
	lock, err := os.OpenFile(filepath.Join(b.root, lockName), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("put %s: %w (gone)", key, bucket.ErrPrecondition)
	}
	if err != nil {
		return err
	}
	if infoOf(fi).ETag != etag {
		return fmt.Errorf("put %s: %w (changed)", key, bucket.ErrPrecondition)
	}
	return atomicfile.Write(p, r, size, 0o644)
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
		return nil, bucket.Info{}, err
	}
	if int64(len(data)) > max {
		return nil, bucket.Info{}, fmt.Errorf("get %s: larger than %d bytes", key, max)
	}
	return data, info, nil
}

// Open implements bucket.Bucket.
func (b *Bucket) Open(ctx context.Context, key string, offset, length int64) (io.ReadCloser, bucket.Info, error) {
	p, err := b.path(key)
	if err != nil {
		return nil, bucket.Info{}, err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, bucket.Info{}, fmt.Errorf("get %s: %w", key, bucket.ErrNotExist)
	}
	if err != nil {
		return nil, bucket.Info{}, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, bucket.Info{}, err
	}
	if fi.IsDir() {
		f.Close()
		return nil, bucket.Info{}, fmt.Errorf("get %s: %w (a directory)", key, bucket.ErrNotExist)
	}
	if offset > 0 {
		if _, err := f.Seek(offset, io.SeekStart); err != nil {
			f.Close()
			return nil, bucket.Info{}, err
		}
	}
	var r io.Reader = f
	if length >= 0 {
		r = io.LimitReader(f, length)
	}
	return &readCloser{Reader: &ctxReader{ctx: ctx, r: r}, Closer: f}, infoOf(fi), nil
}

type readCloser struct {
	io.Reader
	io.Closer
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

// List implements bucket.Bucket.
func (b *Bucket) List(ctx context.Context, opts bucket.ListOptions, fn func(bucket.Object) error) error {
	// The deepest directory that holds every key with the prefix.
	dirKey := ""
	if i := strings.LastIndexByte(opts.Prefix, '/'); i >= 0 {
		dirKey = opts.Prefix[:i]
	}
	start := filepath.Join(b.root, filepath.FromSlash(dirKey))
	var objs []bucket.Object
	err := filepath.WalkDir(start, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, _ := filepath.Rel(b.root, p)
		key := filepath.ToSlash(rel)
		if d.IsDir() {
			if p == start {
				return nil
			}
			if !opts.Recursive || !(strings.HasPrefix(key+"/", opts.Prefix) || strings.HasPrefix(opts.Prefix, key+"/")) {
				return filepath.SkipDir
			}
			return nil
		}
		name := d.Name()
		if !strings.HasPrefix(key, opts.Prefix) || key <= opts.StartAfter || strings.HasPrefix(name, atomicfile.TempPrefix) || key == lockName {
			return nil
		}
		fi, err := d.Info()
		if errors.Is(err, os.ErrNotExist) {
			return nil // deleted meanwhile
		}
		if err != nil {
			return err
		}
		objs = append(objs, bucket.Object{Key: key, Info: infoOf(fi)})
		return nil
	})
	if err != nil {
		return fmt.Errorf("list %q: %w", opts.Prefix, err)
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Key < objs[j].Key })
	for _, o := range objs {
		if err := fn(o); err != nil {
			return err
		}
	}
	return nil
}

// Now is the bucket's clock (the local one): what LastModified is measured
// against.
func (b *Bucket) Now() time.Time { return time.Now() }

// removeTemps removes temp files a crash left. Young ones may belong to
// another process writing the same directory right now.
func (b *Bucket) removeTemps() {
	filepath.WalkDir(b.root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), atomicfile.TempPrefix) {
			if fi, err := d.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				os.Remove(p)
			}
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
