//go:build linux

package vmmspec

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// PrivateTap is the tap name used when a VMM runs without a network
// slot: created in the VMM's own network namespace (loopback only).
const PrivateTap = "tap0"

// openTap opens the tap of o (in netns, or a private one in the
// process's own netns when o.TapName is PrivateTap and netns is empty).
func openTap(o vmmapi.Options, netns string) (*os.File, error) {
	if o.TapName == "" {
		return nil, nil
	}
	if netns != "" {
		return network.OpenTap(runtime.NetSlot{Tap: o.TapName, NetnsPath: netns}, true)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	ifr, err := unix.NewIfreq(o.TapName)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF %s: %w", o.TapName, err)
	}
	return os.NewFile(uintptr(fd), "tap"), nil
}

// ServeConfig configures a VMM process (`cube vmm-restore --guest linux`).
type ServeConfig struct {
	Socket  string
	Options vmmapi.Options
	// Boot boots Options.Kernel now (template bake); otherwise the VMM
	// waits for POST /restore.
	Boot     bool
	TapNetns string
	Log      *slog.Logger
	// Listener, if set, is the control socket (inherited from a jail
	// launcher, which also removes its path); Socket is then unused.
	Listener net.Listener
	// KVMFD > 0 is an open /dev/kvm: each VM gets a duplicate of it.
	KVMFD int
	// BeforeStart runs once before the VM's first guest instruction
	// (snapshot.Controller.BeforeStart: limits, seccomp).
	BeforeStart func(m *machine.Machine) error
}

// DupKVM returns a close-on-exec duplicate of an inherited /dev/kvm fd
// (a VM closes the fd it is given), or 0 when fd is 0.
func DupKVM(fd int) int {
	if fd <= 0 {
		return 0
	}
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return -1
	}
	return d
}

// Serve runs the VMM until it is stopped or its VM stops.
func Serve(cfg ServeConfig) error {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var serial io.Writer
	if p := cfg.Options.SerialLog; p != "" {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		serial = f
	}
	build := func(o vmmapi.Options, netns string, noKernel bool) (machine.Spec, func(), error) {
		out := serial
		var sf *os.File
		if noKernel && o.SerialLog != "" {
			f, err := os.OpenFile(o.SerialLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
			if err != nil {
				return machine.Spec{}, nil, err
			}
			sf, out = f, f
		}
		tap, err := openTap(o, netns)
		if err != nil {
			if sf != nil {
				sf.Close()
			}
			return machine.Spec{}, nil, err
		}
		s, cleanup, err := Build(o, Extra{Tap: tap, Serial: out, Log: log, NoKernel: noKernel})
		if err == nil && cfg.KVMFD > 0 {
			if s.KVMFD = DupKVM(cfg.KVMFD); s.KVMFD < 0 {
				cleanup()
				return machine.Spec{}, nil, fmt.Errorf("dup /dev/kvm fd %d", cfg.KVMFD)
			}
		}
		if sf != nil {
			inner := cleanup
			cleanup = func() {
				if inner != nil {
					inner()
				}
				sf.Close()
			}
		}
		if err != nil && tap != nil {
			tap.Close()
		}
		return s, cleanup, err
	}
	l := cfg.Listener
	if l == nil {
		var err error
		if l, err = net.Listen("unix", cfg.Socket); err != nil {
			return err
		}
	} else {
		cfg.Socket = ""
	}
	done := make(chan struct{})
	ctl := &snapshot.Controller{
		BeforeStart: cfg.BeforeStart,
		Build: func(r vmmapi.RestoreRequest) (machine.Spec, func(), error) {
			return build(*r.Options, r.TapNetns, true)
		},
	}
	ctl.OnStop = func() { close(done) }
	var vmDone <-chan struct{}
	if cfg.Boot {
		spec, cleanup, err := build(cfg.Options, cfg.TapNetns, false)
		if err != nil {
			return err
		}
		m, err := machine.New(spec)
		if err != nil {
			cleanup()
			return err
		}
		ctl.Attach(m)
		ctl.AddCleanup(cleanup)
		if err := ctl.Harden(m); err != nil {
			ctl.Close()
			return err
		}
		if err := m.VM.Start(); err != nil {
			ctl.Close()
			return err
		}
		vmDone = m.VM.Done()
	}
	srv := vmmapi.NewServer(ctl, log)
	go srv.Serve(l)
	watch := time.NewTicker(50 * time.Millisecond)
	defer watch.Stop()
wait:
	for {
		select {
		case <-done:
			break wait
		case <-vmDone:
			break wait
		case <-watch.C:
			// A restored VM that stops on its own (guest poweroff) ends
			// the process too.
			if m := ctl.Machine(); m != nil && vmDone == nil {
				vmDone = m.VM.Done()
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	if cfg.Socket != "" {
		os.Remove(cfg.Socket)
	}
	ctl.Close()
	return nil
}
