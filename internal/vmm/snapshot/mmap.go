//go:build linux

package snapshot

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmapFixed maps fd at off over dst (MAP_PRIVATE|MAP_FIXED), keeping the
// host address (KVM memslots point at it).
func mmapFixed(dst []byte, fd int, off int64) (uintptr, error) {
	addr := uintptr(unsafe.Pointer(&dst[0]))
	r, _, e := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(len(dst)), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_FIXED|unix.MAP_NORESERVE, uintptr(fd), uintptr(off))
	if e != 0 {
		return 0, e
	}
	return r, nil
}
