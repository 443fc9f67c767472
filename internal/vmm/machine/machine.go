//go:build linux

// Package machine assembles a microVM from a Spec: the VM core (package
// vm), the PC legacy devices (COM1 console, i8042 reset, CMOS clock, port
// sinks), virtio-mmio devices at fixed 4 KiB windows announced on the
// kernel command line, and the kernel loaded by package boot. It is what
// `cube vmm` runs; tests use it with synthetic guests.
package machine

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/i8042"
	"github.com/cubesandbox/cube/internal/vmm/devices/legacy"
	"github.com/cubesandbox/cube/internal/vmm/devices/serial"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

// VirtioDevice is a virtio-mmio device to attach. Build receives guest
// memory and the device's interrupt line and returns the transport
// (virtio.NewTransport(...)) the VM maps at the device's window.
type VirtioDevice struct {
	Name  string
	Build func(mem devices.GuestMemory, irq devices.IRQLine) (devices.MMIODevice, error)
	// Close releases the device's back-end (disk files, tap, sockets)
	// when the VM is closed. Optional.
	Close func() error
}

// Spec describes a microVM.
type Spec struct {
	Kernel       []byte
	KernelFormat boot.Format
	Initrd       []byte
	Cmdline      string
	MemSize      uint64
	VCPUs        int
	MemMode      vm.MemoryMode
	MemFile      string
	KVMPath      string
	KVMFD        int
	Serial       io.Writer // guest console output (nil: discarded)
	Virtio       []VirtioDevice
	// NoIOEventFD serves virtio queue notifications through MMIO exits
	// instead of ioeventfds.
	NoIOEventFD bool
	Log         *slog.Logger
	// Restore builds the machine for a snapshot restore (package
	// snapshot): devices are attached as usual but no kernel is loaded
	// and no vCPU state is set; the snapshot supplies both.
	Restore bool
}

// Slot is where an attached virtio device lives.
type Slot struct {
	Name string
	Base uint64
	IRQ  uint32
	Dev  devices.MMIODevice
}

// Machine is a built, not yet started microVM.
type Machine struct {
	VM      *vm.VM
	Serial  *serial.UART
	Slots   []Slot
	Cmdline string
}

// virtioIRQs are the GSIs handed to virtio devices: ISA lines not used by
// the PIT (0), keyboard (1), cascade (2), COM2/COM1 (3, 4), RTC (8), then
// the IOAPIC-only lines 16-23.
var virtioIRQs = []uint32{5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23}

// MaxVirtio is the number of virtio devices a machine can have.
var MaxVirtio = len(virtioIRQs)

// New builds the machine: VM, devices, kernel loaded, boot vCPU set up.
func New(s Spec) (_ *Machine, err error) {
	if len(s.Virtio) > MaxVirtio {
		return nil, fmt.Errorf("%d virtio devices, at most %d", len(s.Virtio), MaxVirtio)
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	v, err := vm.New(vm.Config{MemSize: s.MemSize, VCPUs: s.VCPUs, MemMode: s.MemMode, MemFile: s.MemFile, KVMPath: s.KVMPath, KVMFD: s.KVMFD, Log: s.Log})
	if err != nil {
		return nil, err
	}
	m := &Machine{VM: v}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	com1IRQ, err := v.IRQLine(serial.COM1IRQ)
	if err != nil {
		return nil, err
	}
	m.Serial = serial.New(serial.COM1Port, s.Serial, com1IRQ)
	kbd := i8042.New(func() { v.RequestShutdown("guest reset (i8042)") })
	cmos := legacy.NewCMOS()
	for _, p := range []struct {
		name string
		base uint16
		n    uint16
		dev  devices.PIODevice
	}{
		{"com1", serial.COM1Port, serial.NumPorts, m.Serial},
		{"i8042-data", i8042.DataPort, 1, kbd},
		{"i8042-cmd", i8042.CommandPort, 1, kbd},
		{"cmos", legacy.CMOSIndexPort, 2, cmos},
		{"post", 0x80, 1, legacy.Sink{}},
		{"delay", 0xED, 1, legacy.Sink{}},
	} {
		if err := v.PIO.AddPIO(p.name, p.base, p.n, p.dev); err != nil {
			return nil, err
		}
	}
	v.AddDevice("com1", m.Serial)
	v.AddDevice("i8042", kbd)
	v.AddDevice("cmos", cmos)

	var args []string
	for i, d := range s.Virtio {
		base := boot.VirtioMMIOBase + uint64(i)*boot.VirtioMMIOSize
		irq, err := v.IRQLine(virtioIRQs[i])
		if err != nil {
			return nil, err
		}
		dev, err := d.Build(v.Mem, irq)
		if err != nil {
			return nil, fmt.Errorf("virtio device %s: %w", d.Name, err)
		}
		if err := v.MMIO.AddMMIO(d.Name, base, boot.VirtioMMIOSize, dev); err != nil {
			return nil, err
		}
		v.AddDevice(d.Name, dev)
		if t, ok := dev.(interface {
			vm.QueueNotifier
			Device() virtio.Device
		}); ok && !s.NoIOEventFD {
			if err := v.NotifyEventFDs(base+virtio.RegQueueNotify, len(t.Device().QueueSizes()), t); err != nil {
				return nil, fmt.Errorf("virtio device %s: %w", d.Name, err)
			}
		}
		if d.Close != nil {
			v.OnClose(d.Close)
		} else if c, ok := dev.(io.Closer); ok {
			v.OnClose(c.Close)
		}
		m.Slots = append(m.Slots, Slot{Name: d.Name, Base: base, IRQ: virtioIRQs[i], Dev: dev})
		args = append(args, boot.VirtioMMIOArg(base, boot.VirtioMMIOSize, virtioIRQs[i]))
	}
	m.Cmdline = InsertArgs(s.Cmdline, args)
	if s.Restore {
		return m, nil
	}
	entry, err := boot.Load(v.Mem, boot.Params{
		Kernel: s.Kernel, Format: s.KernelFormat, Initrd: s.Initrd, Cmdline: m.Cmdline,
		MemSize: s.MemSize, VCPUs: s.VCPUs,
	})
	if err != nil {
		return nil, err
	}
	if err := entry.Apply(v.CPUs[0].VCPU); err != nil {
		return nil, err
	}
	return m, nil
}

// InsertArgs adds kernel arguments before any " -- " (arguments after it
// belong to init).
func InsertArgs(cmdline string, args []string) string {
	if len(args) == 0 {
		return cmdline
	}
	extra := strings.Join(args, " ")
	if i := strings.Index(" "+cmdline+" ", " -- "); i >= 0 {
		head := strings.TrimSpace(cmdline[:max(i-1, 0)])
		tail := cmdline[min(i, len(cmdline)):]
		return strings.TrimSpace(head + " " + extra + " " + strings.TrimLeft(tail, " "))
	}
	return strings.TrimSpace(cmdline + " " + extra)
}

// ReadFile reads a kernel or initrd, refusing absurd sizes.
func ReadFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%s is %d bytes, limit %d", path, st.Size(), limit)
	}
	return io.ReadAll(f)
}
