// Package devices holds the small interfaces every emulated device and the
// VM core agree on. Each device lives in its own sub-package and owns its
// snapshot state (Stateful).
package devices

// GuestMemory gives devices access to guest RAM.
type GuestMemory interface {
	// Slice returns the host bytes backing guest-physical [gpa, gpa+n).
	// It returns an error if any part of the range is outside guest RAM;
	// devices must treat that as a guest fault, never panic.
	Slice(gpa, n uint64) ([]byte, error)
	// Size is the guest RAM size in bytes.
	Size() uint64
}

// IRQLine raises an interrupt towards the guest (irqfd or KVM_IRQ_LINE).
type IRQLine interface {
	// Trigger signals an edge on the line.
	Trigger() error
}

// MMIODevice handles guest accesses to its MMIO window. off is relative to
// the window's base; len(data) is 1, 2, 4 or 8.
type MMIODevice interface {
	MMIORead(off uint64, data []byte)
	MMIOWrite(off uint64, data []byte)
}

// PIODevice handles guest port I/O.
type PIODevice interface {
	PIORead(port uint16, data []byte)
	PIOWrite(port uint16, data []byte)
}

// Stateful is implemented by every device that has state to snapshot. The
// encoding is the device's own, versioned by the device.
type Stateful interface {
	SaveState() ([]byte, error)
	RestoreState([]byte) error
}
