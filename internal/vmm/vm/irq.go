//go:build linux

package vm

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }

// IRQ is an interrupt line into the in-kernel irqchip: an eventfd bound
// with KVM_IRQFD to a GSI (default routing: GSI 0-15 reach the PIC and
// IOAPIC, 16-23 the IOAPIC). It implements devices.IRQLine.
type IRQ struct {
	efd int
	gsi uint32
}

// IRQLine returns the line for gsi, creating its irqfd on first use.
func (v *VM) IRQLine(gsi uint32) (*IRQ, error) {
	if gsi >= 24 {
		return nil, fmt.Errorf("gsi %d: the IOAPIC has 24 pins", gsi)
	}
	v.devMu.Lock()
	defer v.devMu.Unlock()
	if irq, ok := v.irqs[gsi]; ok {
		return irq, nil
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := v.KVM.IRQFD(efd, gsi, false); err != nil {
		unix.Close(efd)
		return nil, err
	}
	irq := &IRQ{efd: efd, gsi: gsi}
	v.irqs[gsi] = irq
	return irq, nil
}

// GSI is the line's global system interrupt number.
func (i *IRQ) GSI() uint32 { return i.gsi }

// EventFD is the irqfd (for devices that signal it from their own loop).
func (i *IRQ) EventFD() int { return i.efd }

// Trigger injects an edge.
func (i *IRQ) Trigger() error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 1)
	_, err := unix.Write(i.efd, b[:])
	if err == unix.EAGAIN { // counter saturated: an interrupt is pending anyway
		return nil
	}
	return err
}

// QueueNotifier is a virtio transport whose queue notifications can be
// delivered from an ioeventfd instead of an MMIO exit.
type QueueNotifier interface {
	Notify(q int)
}

// NotifyEventFDs binds one ioeventfd per queue to 4-byte writes of the
// queue index at addr (the virtio-mmio QueueNotify register) and calls
// n.Notify from a goroutine when the guest writes it: the vCPU never
// leaves the kernel for a notification. The fds are closed by Close.
func (v *VM) NotifyEventFDs(addr uint64, queues int, n QueueNotifier) error {
	for q := 0; q < queues; q++ {
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return fmt.Errorf("eventfd: %w", err)
		}
		dm := uint64(q)
		if err := v.KVM.IOEventFD(efd, addr, 4, false, &dm, false); err != nil {
			unix.Close(efd)
			return err
		}
		f := os.NewFile(uintptr(efd), "ioeventfd")
		v.OnClose(func() error {
			_ = v.KVM.IOEventFD(efd, addr, 4, false, &dm, true)
			return f.Close()
		})
		go func(q int) {
			var b [8]byte
			for {
				if _, err := f.Read(b[:]); err != nil {
					return // closed
				}
				v.Metrics.Notifies.Add(binary.LittleEndian.Uint64(b[:])) // writes since the last read
				n.Notify(q)
			}
		}(q)
	}
	return nil
}
