//go:build linux

package main

import (
	"os"
	"path/filepath"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// Snapshot lets `cube vmm` (a booted VM) take a full snapshot on POST
// /snapshot (issue 7; the template bake path). Diff snapshots need a VM
// restored from a snapshot: `cube vmm-restore`. Under the seccomp filter
// the snapshot files must be creatable (see docs/snapshot.md).
func (c *vmmController) Snapshot(r vmmapi.SnapshotRequest) (vmmapi.SnapshotReply, error) {
	if r.Dir == "" {
		return vmmapi.SnapshotReply{}, errs.E(errs.InvalidArgument, "snapshot: dir is required")
	}
	if r.Diff {
		return vmmapi.SnapshotReply{}, errs.E(errs.FailedPrecondition, "diff snapshot: this vm was booted, not restored")
	}
	t0 := time.Now()
	if _, err := snapshot.Take(c.m.VM, r.Dir, snapshot.Options{Resume: r.Resume}); err != nil {
		return vmmapi.SnapshotReply{}, err
	}
	rep := vmmapi.SnapshotReply{Dir: r.Dir, MemBytes: c.m.VM.Mem.Size(),
		PauseMillis: float64(time.Since(t0).Microseconds()) / 1000, Status: c.Status()}
	if fi, err := os.Stat(filepath.Join(r.Dir, snapshot.MemoryFile)); err == nil {
		rep.WrittenMem = uint64(fi.Size())
	}
	return rep, nil
}

// Restore is refused: this process already runs its VM.
func (c *vmmController) Restore(vmmapi.RestoreRequest) (vmmapi.RestoreReply, error) {
	return vmmapi.RestoreReply{}, errs.E(errs.Conflict, "cube vmm runs a booted vm; restores are done by a pre-started `cube vmm-restore`")
}
