//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmrestore"
)

type restoreFlags struct {
	sock, prepare, guest, optsFile, tapNetns string
	bootNow                                  bool
	jailed, noSeccomp, privateMounts         bool
	uid, gid                                 int
	cgroup, limitFDs                         string
	apiFD, kvmFD, startFD                    int
	vmmBin                                   string
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
				return vmmrestore.Run(vmmrestore.Flags{Socket: fl.sock, Prepare: fl.prepare, Guest: fl.guest,
					OptionsFile: fl.optsFile, TapNetns: fl.tapNetns, Boot: fl.bootNow, NoSeccomp: fl.noSeccomp,
					PrivateMounts: fl.privateMounts, LimitFDs: fl.limitFDs, APIFD: fl.apiFD, KVMFD: fl.kvmFD, StartFD: fl.startFD})
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
		f.StringVar(&fl.vmmBin, "vmm-bin", "", "with --jail: the VMM executable (default: cube-vmm beside this binary if present, else this binary)")
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

// runRestoreJailed re-executes vmm-restore (or cube-vmm: vmmBinary)
// through vmmapi.Launch (new namespaces, cgroup, fds 3 = control socket,
// 4 = /dev/kvm, then the cgroup's limit files; Detach: the VMM is created
// as a child of this launcher's parent, CLONE_PARENT) and exits as soon
// as the VMM is in its cgroup and answers on its control socket, printing
// {"pid","cgroup","socket"} on stdout: the launcher costs no memory for
// the sandbox's life. Its parent (the microVM runtime) supervises the VMM
// (vmmapi.Supervise: reaps it, removes the cgroup). If the VMM dies
// before it serves, the launcher removes the cgroup and socket, prints
// the same line with "error" (the parent still has the VMM to reap) and
// fails.
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
	bin := vmmBinary(fl.vmmBin)
	p, err := vmmapi.Launch(ctx, vmmapi.LaunchConfig{
		Binary:     bin,
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
	// One JSON line on stdout either way: the caller learns the VMM's pid
	// (its child: CLONE_PARENT) to supervise it, or to reap it.
	report := func(e error) {
		m := map[string]any{"pid": p.PID(), "cgroup": name, "socket": fl.sock}
		if e != nil {
			m["error"] = e.Error()
		}
		b, _ := json.Marshal(m)
		os.Stdout.Write(append(b, '\n'))
	}
	select {
	case err = <-ready:
		if err == nil {
			report(nil)
			// Exit now: the VMM is our parent's child already.
			os.Exit(0)
		}
		p.Kill()
		err = fmt.Errorf("vmm pid %d did not come up: %w", p.PID(), err)
	case <-p.Done():
		err = fmt.Errorf("vmm pid %d exited before it served (see its messages above)", p.PID())
	case s := <-sig:
		p.Signal(s.(syscall.Signal))
		<-p.Done()
		err = fmt.Errorf("vmm pid %d ended by %s before it served", p.PID(), s)
	}
	report(err)
	return err
}

// vmmBinary is what a jailed launcher executes as the VMM: --vmm-bin, or
// the VMM-only `cube-vmm` beside this executable (it links only the VMM
// packages: ~2 MiB less private memory per sandbox than `cube`, whose
// server packages' inits fill the heap), or this executable.
func vmmBinary(flagged string) string {
	if flagged != "" {
		return flagged
	}
	self, err := os.Executable()
	if err != nil {
		return ""
	}
	sib := filepath.Join(filepath.Dir(self), "cube-vmm")
	if fi, err := os.Stat(sib); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return sib
	}
	return self
}
