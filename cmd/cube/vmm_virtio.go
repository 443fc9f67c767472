//go:build linux

package main

import (
	"log/slog"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// virtioDevices builds the virtio-mmio devices the options ask for. The
// device models (internal/vmm/devices/virtio/...) come from the virtio
// branch; until they are merged here, asking for one is a clear error.
func virtioDevices(o vmmapi.Options, log *slog.Logger) ([]machine.VirtioDevice, error) {
	if len(o.Disks) > 0 || o.TapName != "" || o.TapFD > 0 || o.VsockUDS != "" || o.RNG {
		return nil, errs.E(errs.Unimplemented, "virtio devices (disk, tap, vsock, rng) are not wired into this build yet")
	}
	return nil, nil
}
