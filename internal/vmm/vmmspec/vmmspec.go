//go:build linux

// Package vmmspec turns vmmapi.Options (a VMM's flags) into a
// machine.Spec with its virtio back-ends opened: kernel and initrd,
// virtio-blk disks (read-only base + copy-on-write overlay), virtio-net
// on a tap (by fd, by name in the current netns, or in a slot's netns),
// hybrid virtio-vsock on a unix socket and virtio-rng. Device order is
// fixed (disks, net, vsock, rng) so a restore builds the same device set
// the snapshot was taken with.
package vmmspec

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/blk"
	vnet "github.com/cubesandbox/cube/internal/vmm/devices/virtio/net"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/vsock"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// Extra are back-ends the caller opened itself.
type Extra struct {
	Tap    *os.File  // tap device (overrides Options.TapName/TapFD)
	Serial io.Writer // guest console
	Log    *slog.Logger
	// NoKernel skips reading the kernel (restores).
	NoKernel bool
}

// Build returns the spec and a function closing the back-ends (call it
// after the VM is closed, or on error paths).
func Build(o vmmapi.Options, x Extra) (machine.Spec, func(), error) {
	var closers []io.Closer
	cleanup := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i].Close()
		}
	}
	fail := func(err error) (machine.Spec, func(), error) {
		cleanup()
		return machine.Spec{}, func() {}, err
	}
	s := machine.Spec{Cmdline: o.Cmdline, MemSize: uint64(o.MemMiB) << 20, VCPUs: o.VCPUs, Serial: x.Serial, Log: x.Log}
	if s.VCPUs == 0 {
		s.VCPUs = 1
	}
	if !x.NoKernel {
		if o.Kernel == "" {
			return fail(errors.New("no kernel"))
		}
		k, err := machine.ReadFile(o.Kernel, 256<<20)
		if err != nil {
			return fail(fmt.Errorf("kernel: %w", err))
		}
		s.Kernel = k
		s.KernelFormat = boot.Format(o.KernelFormat)
		if s.KernelFormat == "" {
			s.KernelFormat = boot.FormatAuto
		}
		if o.Initrd != "" {
			if s.Initrd, err = machine.ReadFile(o.Initrd, 1<<30); err != nil {
				return fail(fmt.Errorf("initrd: %w", err))
			}
		}
	}
	for i, d := range o.Disks {
		disk, id, err := OpenDisk(i, d)
		if err != nil {
			return fail(fmt.Errorf("disk %d: %w", i, err))
		}
		closers = append(closers, disk)
		s.Virtio = append(s.Virtio, Transport("blk-"+id, blk.New(disk, id), x.Log))
	}
	tap := x.Tap
	if tap == nil && o.TapFD > 0 {
		f, err := vnet.OpenTapFD(o.TapFD)
		if err != nil {
			return fail(err)
		}
		tap = f
	}
	if tap != nil {
		mac, err := net.ParseMAC(o.MAC)
		if err != nil {
			return fail(fmt.Errorf("mac %q: %w", o.MAC, err))
		}
		dev, err := vnet.New(vnet.Config{Tap: tap, MAC: mac, Log: x.Log})
		if err != nil {
			tap.Close()
			return fail(err)
		}
		closers = append(closers, dev)
		s.Virtio = append(s.Virtio, Transport("net0", dev, x.Log))
	}
	if o.VsockUDS != "" {
		cid := uint64(o.VsockCID)
		if cid == 0 {
			cid = 3
		}
		dev, err := vsock.New(vsock.Config{GuestCID: cid, UDSPath: o.VsockUDS, Log: x.Log})
		if err != nil {
			return fail(err)
		}
		closers = append(closers, dev)
		s.Virtio = append(s.Virtio, Transport("vsock0", dev, x.Log))
	}
	if o.RNG {
		s.Virtio = append(s.Virtio, Transport("rng0", rng.New(), x.Log))
	}
	return s, cleanup, nil
}

// OpenDisk opens disk i of a VMM's options: the base image read-only
// under its copy-on-write overlay, or read-only alone when it has none.
// The id is the disk's, or disk<i>.
func OpenDisk(i int, d vmmapi.Disk) (disk blk.Disk, id string, err error) {
	if d.Overlay != "" {
		disk, err = blk.OpenOverlay(d.Base, d.Overlay)
	} else {
		disk, err = blk.OpenFile(d.Base, true)
	}
	if err != nil {
		return nil, "", err
	}
	id = d.ID
	if id == "" {
		id = fmt.Sprintf("disk%d", i)
	}
	return disk, id, nil
}

// Transport is dev on a virtio-mmio transport, built when the machine is.
func Transport(name string, dev virtio.Device, log *slog.Logger) machine.VirtioDevice {
	return machine.VirtioDevice{Name: name, Build: func(mem devices.GuestMemory, irq devices.IRQLine) (devices.MMIODevice, error) {
		return virtio.NewTransport(dev, mem, irq, virtio.Options{Log: log}), nil
	}}
}
