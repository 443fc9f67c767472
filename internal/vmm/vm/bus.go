//go:build linux

package vm

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/cubesandbox/cube/internal/vmm/devices"
)

// Bus dispatches guest accesses by address to registered ranges. It is
// used for port I/O (addresses are ports) and MMIO (guest-physical). The
// ranges never overlap; lookups are lock-free reads of a sorted copy.
type Bus struct {
	mu     sync.Mutex
	ranges atomic.Pointer[[]busRange]
	// Unhandled counts accesses no device claimed.
	Unhandled atomic.Uint64
}

type busRange struct {
	base, size uint64
	name       string
	pio        devices.PIODevice
	mmio       devices.MMIODevice
}

func (b *Bus) insert(r busRange) error {
	if r.size == 0 || r.base+r.size < r.base {
		return fmt.Errorf("bus range %s [%#x, +%#x): bad size", r.name, r.base, r.size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var cur []busRange
	if p := b.ranges.Load(); p != nil {
		cur = *p
	}
	for _, o := range cur {
		if r.base < o.base+o.size && o.base < r.base+r.size {
			return fmt.Errorf("bus range %s [%#x, +%#x) overlaps %s [%#x, +%#x)", r.name, r.base, r.size, o.name, o.base, o.size)
		}
	}
	nr := append(append([]busRange(nil), cur...), r)
	sort.Slice(nr, func(i, j int) bool { return nr[i].base < nr[j].base })
	b.ranges.Store(&nr)
	return nil
}

// AddPIO registers a port I/O device on ports [base, base+n). The device
// is called with absolute port numbers.
func (b *Bus) AddPIO(name string, base, n uint16, d devices.PIODevice) error {
	return b.insert(busRange{base: uint64(base), size: uint64(n), name: name, pio: d})
}

// AddMMIO registers an MMIO device on [base, base+size). The device is
// called with offsets relative to base.
func (b *Bus) AddMMIO(name string, base, size uint64, d devices.MMIODevice) error {
	return b.insert(busRange{base: base, size: size, name: name, mmio: d})
}

// find returns the range holding [addr, addr+n) entirely.
func (b *Bus) find(addr uint64, n int) (busRange, bool) {
	p := b.ranges.Load()
	if p == nil || n <= 0 {
		return busRange{}, false
	}
	rs := *p
	i := sort.Search(len(rs), func(i int) bool { return rs[i].base+rs[i].size > addr })
	if i == len(rs) {
		return busRange{}, false
	}
	r := rs[i]
	if addr < r.base || uint64(n) > r.size || addr-r.base > r.size-uint64(n) {
		return busRange{}, false
	}
	return r, true
}

func validSize(n int) bool { return n == 1 || n == 2 || n == 4 || n == 8 }

// Read dispatches a read of len(data) bytes at addr. Accesses no device
// claims, of a bad size, or straddling a range end read as all ones.
// It reports whether a device handled it.
func (b *Bus) Read(addr uint64, data []byte) bool {
	if validSize(len(data)) {
		if r, ok := b.find(addr, len(data)); ok {
			if r.pio != nil {
				r.pio.PIORead(uint16(addr), data)
			} else {
				r.mmio.MMIORead(addr-r.base, data)
			}
			return true
		}
	}
	for i := range data {
		data[i] = 0xff
	}
	b.Unhandled.Add(1)
	return false
}

// Write dispatches a write; unclaimed or malformed writes are dropped.
func (b *Bus) Write(addr uint64, data []byte) bool {
	if validSize(len(data)) {
		if r, ok := b.find(addr, len(data)); ok {
			if r.pio != nil {
				r.pio.PIOWrite(uint16(addr), data)
			} else {
				r.mmio.MMIOWrite(addr-r.base, data)
			}
			return true
		}
	}
	b.Unhandled.Add(1)
	return false
}
