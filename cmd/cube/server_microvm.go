//go:build linux

package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/hostinfo"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/microvm"
	"github.com/cubesandbox/cube/internal/runtime/netslot"
)

// The microVM runtime wired into `cube server` (--runtime microvm, or auto
// on a kvm-hardware host). With --network-slots every sandbox gets a
// tap-mode slot of an internal/network Manager through netslot.Wrap
// (wrapper slots: the VMM opens the slot's tap).
func init() {
	runtimeFactories["microvm"] = newMicroVMRuntime
}

// newMicroVMRuntime builds the microvm runtime for the server. It fails
// fast, naming the host kind, where no Linux guest can boot.
func newMicroVMRuntime(ctx context.Context, c config.Config, log *slog.Logger) (runtime.Runtime, error) {
	if k := (hostinfo.Probe{}).Kind(); k != hostinfo.KVMHardware {
		return nil, errs.E(errs.FailedPrecondition,
			"the microvm runtime needs hardware KVM (VT-x/AMD-V with kvm_intel or kvm_amd); this host is %s, where no Linux guest boots: use --runtime gvisor (or auto)", k)
	}
	kernel, err := serverKernel(c)
	if err != nil {
		return nil, err
	}
	log.Info("microvm guest kernel", "path", kernel)
	opts := microvm.Options{Dir: filepath.Join(c.DataDir, "microvm"), Kernel: kernel, PoolSize: c.WarmPoolSize,
		Log: log.With("component", "microvm"), NoJail: !c.VMMJail, NoSeccomp: !c.VMMSeccomp, UID: c.VMMUID, GID: c.VMMGID}
	if !useNetSlots {
		return microvm.New(opts)
	}
	nc := c
	nc.Runtime = "microvm" // slotMode auto -> tap
	m, err := network.NewManager(nc, log.With("component", "network"))
	if err != nil {
		return nil, errs.Wrap(errs.KindOf(err), err, "network slots (run with --network-slots=false to do without)")
	}
	inner, err := microvm.New(opts)
	if err != nil {
		m.Close()
		return nil, err
	}
	rt, err := netslot.Wrap(ctx, inner, m, netslot.Options{StateDir: filepath.Join(c.DataDir, "netslot"), Logger: log})
	if err != nil {
		inner.Close()
		m.Close()
		return nil, err
	}
	return rt, nil
}

// serverKernel finds the guest kernel: config kernelPath (CUBE_KERNEL),
// else the newest `make kernel` output in $(CACHE)/kernel/<hash>/bzImage.
func serverKernel(c config.Config) (string, error) {
	if c.KernelPath != "" {
		if !isFile(c.KernelPath) {
			return "", errs.E(errs.FailedPrecondition, "guest kernel %s (config kernelPath / CUBE_KERNEL) is not a file: run `make kernel`", c.KernelPath)
		}
		return c.KernelPath, nil
	}
	if k := newestKernel(c.CacheDir); k != "" {
		return k, nil
	}
	return "", errs.E(errs.FailedPrecondition, "no guest kernel in %s: run `make kernel` (or set CUBE_KERNEL)",
		filepath.Join(c.CacheDir, "kernel"))
}

// newestKernel is the most recently built cache/kernel/*/bzImage, or "".
func newestKernel(cache string) string {
	m, _ := filepath.Glob(filepath.Join(cache, "kernel", "*", "bzImage"))
	best, bestT := "", int64(0)
	for _, p := range m {
		st, err := os.Stat(p)
		if err != nil || !st.Mode().IsRegular() {
			continue
		}
		if t := st.ModTime().UnixNano(); best == "" || t > bestT {
			best, bestT = p, t
		}
	}
	return best
}

// newMicroVMBaker opens the microvm runtime's state (the server's,
// DataDir/microvm) for `cube tpl`: templates only, beside a running
// server, no pool.
func newMicroVMBaker(c config.Config, log *slog.Logger) (runtime.Runtime, error) {
	if k := (hostinfo.Probe{}).Kind(); k != hostinfo.KVMHardware {
		return nil, errs.E(errs.FailedPrecondition,
			"baking a microvm template needs hardware KVM (VT-x/AMD-V with kvm_intel or kvm_amd); this host is %s: use --runtime gvisor (or auto)", k)
	}
	kernel, err := serverKernel(c)
	if err != nil {
		return nil, err
	}
	return microvm.New(microvm.Options{Dir: filepath.Join(c.DataDir, "microvm"), Kernel: kernel, TemplatesOnly: true,
		Log: log.With("component", "microvm")})
}
