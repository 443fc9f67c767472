//go:build linux

// Package vmmrestore is the pre-started VMM's body (`vmm-restore` without
// --jail, and what a jailed launcher re-executes): wait for the launcher's
// start byte, serve the control socket, restore (or boot) when asked, set
// the cgroup limits and install the seccomp filter before the first
// guest instruction. It is linked both into `cube` and into the VMM-only
// `cube-vmm` binary, which a jailed launcher executes when it sits beside
// `cube`: a VMM that does not carry the server's packages (and their
// package-init heap) costs about 2 MiB less per sandbox.
package vmmrestore

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	goruntime "runtime"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmspec"
)

// SeccompProbeEnv names a syscall a hardened vmm-restore makes right
// after installing its filter (tests prove the filter with it): "open"
// (reading a file by path: refused with EPERM, logged, the VMM goes on)
// or "execve" (kills the process with SIGSYS).
const SeccompProbeEnv = "CUBE_VMM_SECCOMP_PROBE"

// Flags are the VMM's flags (the launcher-only ones stay in cmd/cube).
type Flags struct {
	Socket, Prepare, Guest, OptionsFile, TapNetns string
	Boot, NoSeccomp, PrivateMounts                bool
	LimitFDs                                      string
	APIFD, KVMFD, StartFD                         int
}

// Register defines the flags on fs with the names `cube vmm-restore`
// uses (the launcher passes them on unchanged).
func (fl *Flags) Register(fs *flag.FlagSet) {
	fs.StringVar(&fl.Socket, "api-socket", "", "control socket to listen on")
	fs.StringVar(&fl.Prepare, "prepare", "", "snapshot dir to prepare the restore of ahead of the request")
	fs.StringVar(&fl.Guest, "guest", "synth", "synth (the synthetic test guest) or linux (devices from --options)")
	fs.StringVar(&fl.OptionsFile, "options", "", "linux: vmmapi.Options JSON file (kernel, disks, tap, vsock, rng)")
	fs.BoolVar(&fl.Boot, "boot", false, "linux: boot the kernel now instead of waiting for a restore")
	fs.StringVar(&fl.TapNetns, "tap-netns", "", "linux: network namespace holding the tap named in the options")
	fs.BoolVar(&fl.NoSeccomp, "no-seccomp", false, "do not install the seccomp filter (debugging)")
	fs.IntVar(&fl.APIFD, "api-fd", 0, "inherited listening control socket fd (set by --jail)")
	fs.IntVar(&fl.KVMFD, "kvm-fd", 0, "inherited /dev/kvm fd (set by --jail)")
	fs.StringVar(&fl.LimitFDs, "limit-fds", "", "inherited cgroup limit files (set by --jail)")
	fs.IntVar(&fl.StartFD, "start-fd", 0, "wait for a byte on this inherited pipe before serving (set by --jail)")
	fs.BoolVar(&fl.PrivateMounts, "private-mounts", false, "make all mounts private (set by the launcher)")
}

// Run is the VMM itself (jailed or not).
func Run(fl Flags) error {
	if fl.StartFD > 0 {
		// The launcher writes one byte once this process is in its cgroup
		// (EOF: it gave up; it kills us then anyway).
		f := os.NewFile(uintptr(fl.StartFD), "start")
		var b [1]byte
		n, _ := f.Read(b[:])
		f.Close()
		if n != 1 {
			return fmt.Errorf("launcher went away before the VMM joined its cgroup")
		}
	}
	var l net.Listener
	if fl.APIFD > 0 {
		f := os.NewFile(uintptr(fl.APIFD), "api")
		var err error
		l, err = net.FileListener(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("control socket fd %d: %w", fl.APIFD, err)
		}
	} else if fl.Socket == "" {
		return fmt.Errorf("--api-socket is required")
	}
	if fl.PrivateMounts {
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("make mounts private: %w", err)
		}
	}
	var limits *jail.LimitFiles
	if fl.LimitFDs != "" {
		var err error
		if limits, err = jail.ParseLimitFDs(fl.LimitFDs); err != nil {
			return err
		}
	}
	probe := os.Getenv(SeccompProbeEnv)
	os.Unsetenv(SeccompProbeEnv)
	harden := func(m *machine.Machine) error {
		if limits != nil {
			lim := vmmapi.Limits(vmmapi.Options{MemMiB: int(m.VM.Mem.Size() >> 20), VCPUs: len(m.VM.CPUs)})
			err := limits.Apply(lim)
			limits.Close()
			if err != nil {
				return fmt.Errorf("cgroup limits: %w", err)
			}
		}
		if fl.NoSeccomp {
			return nil
		}
		// Setting GOMAXPROCS ends the runtime's cgroup-driven updates,
		// which would re-read cgroup files under the filter.
		goruntime.GOMAXPROCS(goruntime.GOMAXPROCS(0))
		if err := snapshot.KeepPagemap(); err != nil {
			return err
		}
		if err := jail.InstallSnapshot(); err != nil {
			return fmt.Errorf("seccomp: %w", err)
		}
		seccompProbe(probe)
		return nil
	}
	switch fl.Guest {
	case "synth":
		return st.ServeWith(st.ServeConfig{Socket: fl.Socket, Listener: l, Prepare: fl.Prepare, KVMFD: fl.KVMFD, BeforeStart: harden})
	case "linux":
		var o vmmapi.Options
		if fl.OptionsFile != "" {
			b, err := os.ReadFile(fl.OptionsFile)
			if err != nil {
				return err
			}
			if err := json.Unmarshal(b, &o); err != nil {
				return fmt.Errorf("--options %s: %w", fl.OptionsFile, err)
			}
		}
		return vmmspec.Serve(vmmspec.ServeConfig{Socket: fl.Socket, Listener: l, KVMFD: fl.KVMFD, Options: o,
			Boot: fl.Boot, TapNetns: fl.TapNetns, BeforeStart: harden})
	default:
		return fmt.Errorf("--guest %q: synth or linux", fl.Guest)
	}
}

// seccompProbe makes the syscall named by CUBE_VMM_SECCOMP_PROBE (tests).
func seccompProbe(probe string) {
	switch probe {
	case "":
	case "open":
		_, err := os.Open("/etc/hostname")
		fmt.Fprintf(os.Stderr, "cube vmm-restore: seccomp probe: open /etc/hostname: %v\n", err)
	case "execve":
		fmt.Fprintf(os.Stderr, "cube vmm-restore: seccomp probe: execve /bin/true\n")
		err := unix.Exec("/bin/true", []string{"true"}, nil)
		fmt.Fprintf(os.Stderr, "cube vmm-restore: seccomp probe: execve returned: %v\n", err)
	default:
		fmt.Fprintf(os.Stderr, "cube vmm-restore: unknown seccomp probe %q\n", probe)
	}
}
