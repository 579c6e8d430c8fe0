package main

// A slow disk for etcd, so tests can see what a host whose etcd takes a
// second per write does to the proxy (issue #14: "etcd slow, 1 s per write").
// etcd acknowledges a write only after fdatasync of its WAL, so delaying
// fsync and fdatasync slows every write and leaves reads as they are, which
// is what a slow disk does. The delay is read from a control file on every
// sync, so a running harness is made slow and fast again by writing to it.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// slowDisk is a FUSE pass-through mounted over etcd's data directory.
type slowDisk struct {
	server     *fuse.Server
	mountpoint string
}

// syncDelay reads the control file: a Go duration ("1s"); missing or empty
// means no delay. A file that does not parse is logged and ignored, so a
// typo cannot stall etcd forever.
func syncDelay(control string) time.Duration {
	b, err := os.ReadFile(control)
	if err != nil {
		return 0
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		logf("%s: %q is not a duration such as 1s; syncing without delay", control, s)
		return 0
	}
	return d
}

// slowNode is a loopback node whose fsync (files and directories) first
// waits for the control file's delay.
type slowNode struct {
	fs.LoopbackNode
	control string
}

var _ = (fs.NodeFsyncer)((*slowNode)(nil))

func (n *slowNode) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if d := syncDelay(n.control); d > 0 {
		time.Sleep(d)
	}
	if s, ok := f.(fs.FileFsyncer); ok {
		return s.Fsync(ctx, flags)
	}
	// A directory sync (no file handle that syncs): sync the backing dir.
	dir, err := os.Open(filepath.Join(n.RootData.Path, n.Path(n.Root())))
	if err != nil {
		return fs.ToErrno(err)
	}
	defer dir.Close()
	return fs.ToErrno(dir.Sync())
}

// mountSlowDisk serves backing at mountpoint (both made if missing) with
// syncs delayed as control says. A mount left by a harness that was killed
// is detached first.
func mountSlowDisk(backing, mountpoint, control string) (*slowDisk, error) {
	_ = syscall.Unmount(mountpoint, syscall.MNT_DETACH)
	for _, d := range []string{backing, mountpoint} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", backing, err)
	}
	root := &fs.LoopbackRoot{Path: backing, Dev: uint64(st.Dev)}
	root.NewNode = func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
		return &slowNode{LoopbackNode: fs.LoopbackNode{RootData: r}, control: control}
	}
	root.RootNode = root.NewNode(root, nil, "", &st)
	server, err := fs.Mount(mountpoint, root.RootNode, &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:            "kube-harness-slowdisk",
			Name:              "slowdisk",
			DirectMountStrict: true, // the harness runs as root when asked for this; no fusermount
		},
	})
	if err != nil {
		return nil, fmt.Errorf("mounting a FUSE file system at %s (needs root and /dev/fuse): %w", mountpoint, err)
	}
	if err := server.WaitMount(); err != nil {
		_ = server.Unmount()
		return nil, err
	}
	return &slowDisk{server: server, mountpoint: mountpoint}, nil
}

// Close unmounts; etcd must have stopped. Nil (no slow disk) does nothing.
func (d *slowDisk) Close() {
	if d == nil {
		return
	}
	if err := d.server.Unmount(); err != nil && !errors.Is(err, syscall.EINVAL) {
		logf("unmounting %s: %v; detaching it", d.mountpoint, err)
		_ = syscall.Unmount(d.mountpoint, syscall.MNT_DETACH)
	}
}
