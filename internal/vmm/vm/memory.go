//go:build linux

package vm

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/boot"
)

// MemoryMode selects how guest RAM is backed.
type MemoryMode int

const (
	// MemAnonymous is private anonymous memory (a fresh boot).
	MemAnonymous MemoryMode = iota
	// MemFilePrivate maps a memory file MAP_PRIVATE: the guest sees the
	// file's contents, its writes are copy-on-write and never reach the
	// file (restore from a snapshot; many VMs can share one page-cached
	// file).
	MemFilePrivate
	// MemFileShared maps a memory file MAP_SHARED: guest writes reach the
	// file (a VM whose memory is saved in place).
	MemFileShared
)

// Memory is guest RAM: one host mapping laid out as the guest-physical
// RAM ranges of boot.RAMRanges (below the MMIO gap, then above 4 GiB).
// It implements devices.GuestMemory. Guest RAM is never mlocked
// (RLIMIT_MEMLOCK is small on our hosts).
type Memory struct {
	buf  []byte
	size uint64
	mode MemoryMode
	path string
}

// NewMemory maps size bytes of guest RAM. For the file modes path names
// the memory file; it must be at least size bytes long.
func NewMemory(size uint64, mode MemoryMode, path string) (*Memory, error) {
	if size < 1<<20 || size%4096 != 0 {
		return nil, fmt.Errorf("guest memory size %d: must be a multiple of 4 KiB and at least 1 MiB", size)
	}
	if size > 1<<40 {
		return nil, fmt.Errorf("guest memory size %d: too large", size)
	}
	m := &Memory{size: size, mode: mode, path: path}
	var err error
	switch mode {
	case MemAnonymous:
		m.buf, err = unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	case MemFilePrivate, MemFileShared:
		var f *os.File
		flag := os.O_RDONLY
		if mode == MemFileShared {
			flag = os.O_RDWR
		}
		f, err = os.OpenFile(path, flag, 0)
		if err != nil {
			return nil, fmt.Errorf("memory file: %w", err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return nil, fmt.Errorf("memory file: %w", err)
		}
		if uint64(st.Size()) < size {
			return nil, fmt.Errorf("memory file %s is %d bytes, guest RAM is %d", path, st.Size(), size)
		}
		flags := unix.MAP_PRIVATE | unix.MAP_NORESERVE
		if mode == MemFileShared {
			flags = unix.MAP_SHARED
		}
		m.buf, err = unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, flags)
	default:
		return nil, fmt.Errorf("unknown memory mode %d", mode)
	}
	if err != nil {
		return nil, fmt.Errorf("mmap guest memory (%d bytes): %w", size, err)
	}
	return m, nil
}

// Size is the guest RAM size.
func (m *Memory) Size() uint64 { return m.size }

// Mode is how the memory is backed.
func (m *Memory) Mode() MemoryMode { return m.mode }

// Host returns the whole host mapping (host offset order: RAM below the
// gap, then RAM above 4 GiB). Snapshots write it out as the memory file.
func (m *Memory) Host() []byte { return m.buf }

// hostOffset maps a guest-physical address to an offset in buf.
func (m *Memory) hostOffset(gpa uint64) (uint64, bool) {
	for _, r := range boot.RAMRanges(m.size) {
		if gpa >= r[0] && gpa-r[0] < r[1] {
			off := gpa - r[0]
			if r[0] != 0 {
				off += boot.MMIOGapStart
			}
			return off, true
		}
	}
	return 0, false
}

// Slice returns the host bytes backing [gpa, gpa+n). The range must lie
// within one RAM range.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	if m.buf == nil {
		return nil, fmt.Errorf("guest memory is unmapped")
	}
	off, ok := m.hostOffset(gpa)
	if !ok {
		return nil, fmt.Errorf("guest address %#x is not RAM", gpa)
	}
	if n == 0 {
		return m.buf[off:off], nil
	}
	last, ok := m.hostOffset(gpa + n - 1)
	if !ok || gpa+n-1 < gpa || last != off+n-1 {
		return nil, fmt.Errorf("guest range [%#x, +%#x) is not RAM", gpa, n)
	}
	return m.buf[off : off+n : off+n], nil
}

// Write copies b to guest-physical gpa.
func (m *Memory) Write(gpa uint64, b []byte) error {
	d, err := m.Slice(gpa, uint64(len(b)))
	if err != nil {
		return err
	}
	copy(d, b)
	return nil
}

// Close unmaps guest RAM.
func (m *Memory) Close() error {
	if m.buf == nil {
		return nil
	}
	err := unix.Munmap(m.buf)
	m.buf = nil
	return err
}
