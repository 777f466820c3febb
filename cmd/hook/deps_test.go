package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestHookDependencies keeps the hook small and fast to start: it must not
// link the queue database, an S3 client or the network poller's heavy users,
// nor package net, which links the C library (its resolver) into the hook
// and makes every start a dynamically linked one (about a millisecond more,
// and more CPU per hook when many run at once).
func TestHookDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	forbidden := []string{"go.etcd.io/bbolt", "github.com/minio/minio-go", "github.com/nixspool/nixspool/internal/queue", "github.com/nixspool/nixspool/internal/uploader", "net", "runtime/cgo", "os/user"}
	for _, dep := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if dep == f || strings.HasPrefix(dep, f+"/") {
				t.Errorf("cmd/hook depends on %s", dep)
			}
		}
	}
}
