//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	goruntime "runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmspec"
)

// seccompProbeEnv names a syscall a hardened vmm-restore makes right
// after installing its filter (tests prove the filter with it): "open"
// (reading a file by path: refused with EPERM, logged, the VMM goes on)
// or "execve" (kills the process with SIGSYS).
const seccompProbeEnv = "CUBE_VMM_SECCOMP_PROBE"

type restoreFlags struct {
	sock, prepare, guest, optsFile, tapNetns string
	bootNow                                  bool
	jailed, noSeccomp, privateMounts         bool
	uid, gid                                 int
	cgroup, limitFDs                         string
	apiFD, kvmFD, startFD                    int
}

func init() {
	addCommand(func() *cobra.Command {
		var fl restoreFlags
		cmd := &cobra.Command{
			Use:   "vmm-restore",
			Short: "A pre-started VMM that restores a snapshot when asked (POST /restore on its control socket)",
			Long: `A pre-started VMM: it waits on its control socket, then restores a snapshot
(or boots with --boot) and serves /snapshot (full and diff), /pause, /resume
and /stop. Once its VM is built, before the first guest instruction, it sets
its cgroup limits (with --jail) and installs its seccomp filter (unless
--no-seccomp). With --jail it re-executes itself in new mount/net/IPC/UTS
namespaces and its own cgroup, optionally as --uid/--gid (see docs/vmm.md).`,
			Hidden: true,
			Args:   cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if fl.jailed {
					return runRestoreJailed(cmd.Context(), fl)
				}
				return runRestore(fl)
			},
		}
		f := cmd.Flags()
		f.StringVar(&fl.sock, "api-socket", "", "control socket to listen on")
		f.StringVar(&fl.prepare, "prepare", "", "snapshot dir to prepare the restore of ahead of the request")
		f.StringVar(&fl.guest, "guest", "synth", "synth (the synthetic test guest) or linux (devices from --options)")
		f.StringVar(&fl.optsFile, "options", "", "linux: vmmapi.Options JSON file (kernel, disks, tap, vsock, rng)")
		f.BoolVar(&fl.bootNow, "boot", false, "linux: boot the kernel now instead of waiting for a restore")
		f.StringVar(&fl.tapNetns, "tap-netns", "", "linux: network namespace holding the tap named in the options")
		f.BoolVar(&fl.jailed, "jail", false, "re-execute in new namespaces and a cgroup (needs --api-socket)")
		f.StringVar(&fl.cgroup, "cgroup", "", "with --jail: cgroup name (cube-vmm/NAME; default vmm-restore-PID)")
		f.IntVar(&fl.uid, "uid", 0, "with --jail: run the VMM as this uid")
		f.IntVar(&fl.gid, "gid", 0, "with --jail: run the VMM as this gid")
		f.BoolVar(&fl.noSeccomp, "no-seccomp", false, "do not install the seccomp filter (debugging)")
		f.IntVar(&fl.apiFD, "api-fd", 0, "inherited listening control socket fd (set by --jail)")
		f.IntVar(&fl.kvmFD, "kvm-fd", 0, "inherited /dev/kvm fd (set by --jail)")
		f.StringVar(&fl.limitFDs, "limit-fds", "", "inherited cgroup limit files (set by --jail)")
		f.IntVar(&fl.startFD, "start-fd", 0, "wait for a byte on this inherited pipe before serving (set by --jail: joined the cgroup)")
		f.BoolVar(&fl.privateMounts, "private-mounts", false, "make all mounts private (set by the launcher)")
		for _, n := range []string{"api-fd", "kvm-fd", "limit-fds", "start-fd", "private-mounts"} {
			_ = f.MarkHidden(n)
		}
		return cmd
	})
}

// runRestoreJailed re-executes vmm-restore through vmmapi.Launch (new
// namespaces, cgroup, fds 3 = control socket, 4 = /dev/kvm, then the
// cgroup's limit files) and exits as soon as the VMM is in its cgroup
// and answers on its control socket, printing {"pid","cgroup","socket"}
// on stdout: the launcher costs no memory for the sandbox's life. The
// VMM is reparented to the caller's subreaper (the microVM runtime sets
// PR_SET_CHILD_SUBREAPER and supervises it: vmmapi.Supervise reaps it and
// removes the cgroup) or to init. If the VMM dies before it serves, the
// launcher relays its fate (exit code, or 128+signal) and removes the
// cgroup and socket itself.
func runRestoreJailed(ctx context.Context, fl restoreFlags) error {
	if fl.sock == "" {
		return fmt.Errorf("--jail needs --api-socket")
	}
	name := fl.cgroup
	if name == "" {
		name = "vmm-restore-" + strconv.Itoa(os.Getpid())
	}
	if err := jail.CgroupsAvailable(); err != nil {
		// Namespaces, fds and seccomp still apply.
		fmt.Fprintf(os.Stderr, "cube vmm-restore: no usable cgroups (%v): the VMM runs without a cgroup of its own\n", err)
		name = ""
	}
	sub := []string{"vmm-restore", "--guest=" + fl.guest}
	for k, v := range map[string]string{"prepare": fl.prepare, "options": fl.optsFile, "tap-netns": fl.tapNetns} {
		if v != "" {
			sub = append(sub, "--"+k+"="+v)
		}
	}
	if fl.bootNow {
		sub = append(sub, "--boot")
	}
	if fl.noSeccomp {
		sub = append(sub, "--no-seccomp")
	}
	p, err := vmmapi.Launch(ctx, vmmapi.LaunchConfig{
		Subcommand: sub, Socket: fl.sock, Isolate: true, SharedMounts: true, Detach: true,
		// The VMM writes to stderr only: stdout carries the launcher's
		// one JSON line and is closed when it exits.
		UID: fl.uid, GID: fl.gid, Cgroup: name, Stdout: os.Stderr, Stderr: os.Stderr,
	})
	if err != nil {
		return fmt.Errorf("launch vmm-restore: %w", err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ready := make(chan error, 1)
	go func() { _, err := p.Client.WaitReady(rctx); ready <- err }()
	select {
	case err := <-ready:
		if err == nil {
			b, _ := json.Marshal(map[string]any{"pid": p.PID(), "cgroup": name, "socket": fl.sock})
			os.Stdout.Write(append(b, '\n'))
			// Exit now: the VMM (not waited for) is reparented.
			os.Exit(0)
		}
		p.Kill()
		return fmt.Errorf("vmm pid %d did not come up: %w", p.PID(), err)
	case <-p.Done():
	case s := <-sig:
		p.Cmd.Process.Signal(s)
		<-p.Done()
	}
	err = p.Wait(context.Background())
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fmt.Fprintf(os.Stderr, "cube vmm-restore: vmm pid %d killed by signal %d (%s)\n", p.PID(), int(ws.Signal()), ws.Signal())
			os.Exit(128 + int(ws.Signal()))
		}
		os.Exit(ee.ExitCode())
	}
	if err == nil {
		err = fmt.Errorf("vmm pid %d exited before it served", p.PID())
	}
	return err
}

// runRestore is the VMM itself (jailed or not).
func runRestore(fl restoreFlags) error {
	if fl.startFD > 0 {
		// The launcher writes one byte once this process is in its cgroup
		// (EOF: it gave up; it kills us then anyway).
		f := os.NewFile(uintptr(fl.startFD), "start")
		var b [1]byte
		n, _ := f.Read(b[:])
		f.Close()
		if n != 1 {
			return fmt.Errorf("launcher went away before the VMM joined its cgroup")
		}
	}
	var l net.Listener
	if fl.apiFD > 0 {
		f := os.NewFile(uintptr(fl.apiFD), "api")
		var err error
		l, err = net.FileListener(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("control socket fd %d: %w", fl.apiFD, err)
		}
	} else if fl.sock == "" {
		return fmt.Errorf("--api-socket is required")
	}
	if fl.privateMounts {
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("make mounts private: %w", err)
		}
	}
	var limits *jail.LimitFiles
	if fl.limitFDs != "" {
		var err error
		if limits, err = jail.ParseLimitFDs(fl.limitFDs); err != nil {
			return err
		}
	}
	probe := os.Getenv(seccompProbeEnv)
	os.Unsetenv(seccompProbeEnv)
	harden := func(m *machine.Machine) error {
		if limits != nil {
			lim := vmmapi.Limits(vmmapi.Options{MemMiB: int(m.VM.Mem.Size() >> 20), VCPUs: len(m.VM.CPUs)})
			err := limits.Apply(lim)
			limits.Close()
			if err != nil {
				return fmt.Errorf("cgroup limits: %w", err)
			}
		}
		if fl.noSeccomp {
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
	switch fl.guest {
	case "synth":
		return st.ServeWith(st.ServeConfig{Socket: fl.sock, Listener: l, Prepare: fl.prepare, KVMFD: fl.kvmFD, BeforeStart: harden})
	case "linux":
		var o vmmapi.Options
		if fl.optsFile != "" {
			b, err := os.ReadFile(fl.optsFile)
			if err != nil {
				return err
			}
			if err := json.Unmarshal(b, &o); err != nil {
				return fmt.Errorf("--options %s: %w", fl.optsFile, err)
			}
		}
		return vmmspec.Serve(vmmspec.ServeConfig{Socket: fl.sock, Listener: l, KVMFD: fl.kvmFD, Options: o,
			Boot: fl.bootNow, TapNetns: fl.tapNetns, BeforeStart: harden})
	default:
		return fmt.Errorf("--guest %q: synth or linux", fl.guest)
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
