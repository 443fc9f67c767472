//go:build linux

package snapshot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

// Diff snapshots. A VM restored from a snapshot maps its memory file
// (and layers) MAP_PRIVATE. A page the VM never wrote is still the file's
// page-cache page; the first write (by a vCPU, or by a device through the
// same mapping, or by KVM itself) replaces it with a private anonymous
// copy. /proc/self/pagemap tells the two apart (bit 61: file page or
// shared anon), so the pages changed since the restore are exactly the
// present (bit 63) or swapped (bit 62) pages without bit 61. A diff
// snapshot writes only those pages into a new layer file and lists the
// base file and older layers by name (hard links into the new directory).

const (
	pmPresent  = 1 << 63
	pmSwapped  = 1 << 62
	pmFileOrSh = 1 << 61
)

// Limits past which a diff is flattened into a full snapshot: every run
// is one mapping at restore time.
const (
	maxLayers   = 8
	maxLayerRun = 16384
)

// DirtyRuns returns the runs of pages of mem that are private copies
// (changed since the file was mapped). mem must be a MAP_PRIVATE file
// mapping of this process.
func DirtyRuns(mem []byte) ([]Run, error) {
	f := keptPagemap.Load()
	if f == nil {
		var err error
		if f, err = os.Open("/proc/self/pagemap"); err != nil {
			return nil, err
		}
		defer f.Close()
	}
	pages := len(mem) / pageSize
	base := uintptr(unsafe.Pointer(&mem[0])) / pageSize
	const chunk = 8192
	buf := make([]byte, 8*chunk)
	var runs []Run
	for p := 0; p < pages; p += chunk {
		n := min(chunk, pages-p)
		if _, err := f.ReadAt(buf[:8*n], int64(base+uintptr(p))*8); err != nil {
			return nil, fmt.Errorf("read pagemap: %w", err)
		}
		for i := 0; i < n; i++ {
			e := binary.LittleEndian.Uint64(buf[8*i:])
			if e&(pmPresent|pmSwapped) == 0 || e&pmFileOrSh != 0 {
				continue
			}
			pg := uint64(p + i)
			if l := len(runs); l > 0 && runs[l-1].Page+runs[l-1].Count == pg {
				runs[l-1].Count++
			} else {
				runs = append(runs, Run{Page: pg, Count: 1})
			}
		}
	}
	return runs, nil
}

var keptPagemap atomic.Pointer[os.File]

// KeepPagemap opens /proc/self/pagemap for good: diff snapshots then
// read it without opening a file (a VMM calls it before its seccomp
// filter, which refuses opening files for reading).
func KeepPagemap() error {
	if keptPagemap.Load() != nil {
		return nil
	}
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return err
	}
	if !keptPagemap.CompareAndSwap(nil, f) {
		f.Close()
	}
	return nil
}

// DiffResult reports a diff snapshot.
type DiffResult struct {
	State        *State
	Runs         int
	WrittenBytes uint64
	Flattened    bool // too many layers or runs: a full snapshot was written
}

// TakeDiff snapshots v, which was restored from the snapshot in fromDir
// (whose state is base), into dir, writing only the pages v changed
// since the restore as a new layer. dir may equal fromDir (the snapshot
// is then replaced atomically by one with an extra layer).
func TakeDiff(v *vm.VM, fromDir string, base *State, dir string, o Options) (*DiffResult, error) {
	if v.Mem.Mode() != vm.MemFilePrivate {
		return nil, errs.E(errs.FailedPrecondition, "diff snapshot: vm memory is not a private file mapping")
	}
	s, done, err := captureQuiesced(v, o)
	if err != nil {
		return nil, err
	}
	defer done()
	runs, err := DirtyRuns(v.Mem.Host())
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "diff snapshot: %v", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, errs.Wrap(errs.Internal, err, "snapshot dir %s: %v", dir, err)
	}
	total := len(runs)
	for _, l := range base.Meta.Layers {
		total += len(l.Runs)
	}
	if len(base.Meta.Layers) >= maxLayers || total > maxLayerRun {
		if err := writeMemory(filepath.Join(dir, MemoryFile), v.Mem.Host(), nil); err != nil {
			return nil, err
		}
		if err := writeState(dir, s); err != nil {
			return nil, err
		}
		return &DiffResult{State: s, Runs: len(runs), WrittenBytes: v.Mem.Size(), Flattened: true}, nil
	}
	// Reference the base memory and older layers from dir.
	s.Meta.MemFile = base.Meta.MemFile
	s.Meta.Layers = append([]Layer(nil), base.Meta.Layers...)
	for _, name := range append([]string{base.Meta.MemFile}, layerFiles(base)...) {
		if err := linkInto(fromDir, dir, name); err != nil {
			return nil, err
		}
	}
	name := fmt.Sprintf("layer-%d-%d", len(base.Meta.Layers)+1, time.Now().UnixNano())
	if err := writeMemory(filepath.Join(dir, name), v.Mem.Host(), runs); err != nil {
		return nil, err
	}
	s.Meta.Layers = append(s.Meta.Layers, Layer{File: name, Runs: runs})
	if err := writeState(dir, s); err != nil {
		return nil, err
	}
	var written uint64
	for _, r := range runs {
		written += r.Count * pageSize
	}
	return &DiffResult{State: s, Runs: len(runs), WrittenBytes: written}, nil
}

func layerFiles(s *State) []string {
	var out []string
	for _, l := range s.Meta.Layers {
		out = append(out, l.File)
	}
	return out
}

// linkInto makes dir/name refer to fromDir/name (hard link; symlink
// across filesystems or where protected_hardlinks refuses the link). Same dir: nothing to do.
func linkInto(fromDir, dir, name string) error {
	src, dst := filepath.Join(fromDir, name), filepath.Join(dir, name)
	if a, err := filepath.Abs(fromDir); err == nil {
		if b, err := filepath.Abs(dir); err == nil && a == b {
			return nil
		}
	}
	if _, err := os.Lstat(dst); err == nil {
		return nil
	}
	err := os.Link(src, dst)
	// Across filesystems, or refused by fs.protected_hardlinks (a VMM
	// running as its own uid linking a file it does not own): symlink.
	if errors.Is(err, syscall.EXDEV) || errors.Is(err, syscall.EPERM) {
		abs, aerr := filepath.Abs(src)
		if aerr != nil {
			return errs.Wrap(errs.Internal, aerr, "link %s", src)
		}
		err = os.Symlink(abs, dst)
	}
	if err != nil {
		return errs.Wrap(errs.Internal, err, "link %s into %s: %v", src, dir, err)
	}
	return nil
}

// allocated is the disk space a file uses (sparse files: less than size).
func allocated(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Blocks) * 512
	}
	return uint64(fi.Size())
}
