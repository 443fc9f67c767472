//go:build linux

package main

import (
	"log/slog"
	"net"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/blk"
	vnet "github.com/cubesandbox/cube/internal/vmm/devices/virtio/net"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/vsock"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmspec"
)

// DefaultMAC is the guest MAC when --mac is not given (locally
// administered, unicast).
const DefaultMAC = "02:cb:00:00:00:01"

// virtioDevices builds the virtio-mmio devices the options ask for, in
// slot order: disks (the first is /dev/vda), net, vsock, rng. Back-ends
// (files, tap, listening socket) are opened here, before the seccomp
// filter is installed.
func virtioDevices(o vmmapi.Options, log *slog.Logger) (_ []machine.VirtioDevice, err error) {
	var out []machine.VirtioDevice
	var closers []func() error
	defer func() {
		if err != nil {
			for _, c := range closers {
				c()
			}
		}
	}()
	transport := func(name string, dev virtio.Device, closeFn func() error) {
		vd := vmmspec.Transport(name, dev, log.With("device", name))
		vd.Close = closeFn
		out = append(out, vd)
		if closeFn != nil {
			closers = append(closers, closeFn)
		}
	}
	for i, d := range o.Disks {
		disk, id, err := vmmspec.OpenDisk(i, d)
		if err != nil {
			return nil, errs.Wrap(errs.InvalidArgument, err, "disk %d", i)
		}
		transport("blk-"+id, blk.New(disk, id), disk.Close)
	}
	if o.TapName != "" || o.TapFD > 0 {
		fd := o.TapFD
		if o.TapName != "" {
			if fd, err = vmmapi.OpenTapFD(o.TapName); err != nil {
				return nil, errs.Wrap(errs.InvalidArgument, err, "tap")
			}
		} else {
			unix.CloseOnExec(fd)
		}
		tap, err := vnet.OpenTapFD(fd)
		if err != nil {
			unix.Close(fd)
			return nil, errs.Wrap(errs.InvalidArgument, err, "tap")
		}
		macStr := o.MAC
		if macStr == "" {
			macStr = DefaultMAC
		}
		mac, err := net.ParseMAC(macStr)
		if err != nil {
			tap.Close()
			return nil, errs.Wrap(errs.InvalidArgument, err, "--mac")
		}
		nd, err := vnet.New(vnet.Config{Tap: tap, MAC: mac, Log: log.With("device", "net")})
		if err != nil {
			tap.Close()
			return nil, errs.Wrap(errs.InvalidArgument, err, "virtio-net")
		}
		transport("net0", nd, nd.Close)
	}
	if o.VsockUDS != "" {
		vd, err := vsock.New(vsock.Config{GuestCID: uint64(o.VsockCID), UDSPath: o.VsockUDS, Log: log.With("device", "vsock")})
		if err != nil {
			return nil, errs.Wrap(errs.InvalidArgument, err, "virtio-vsock")
		}
		transport("vsock0", vd, vd.Close)
	}
	if o.RNG {
		transport("rng0", rng.New(), nil)
	}
	if len(out) > machine.MaxVirtio {
		return nil, errs.E(errs.InvalidArgument, "%d virtio devices, at most %d", len(out), machine.MaxVirtio)
	}
	return out, nil
}
