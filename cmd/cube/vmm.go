//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/synth"
	"github.com/cubesandbox/cube/internal/vmm/vm"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

func init() { addCommand(newVMMCmd) }

func newVMMCmd() *cobra.Command {
	var (
		o             vmmapi.Options
		disks         []string
		privateMounts bool
		jailed        bool
		uid, gid      int
	)
	cmd := &cobra.Command{
		Use:   "vmm",
		Short: "Run one microVM on KVM (one process per VM, controlled over a unix socket)",
		Long: `Run one microVM on KVM. The VM starts at once (or on POST /start with
--no-start) and the process exits when the VM stops: exit code 0 when it was
stopped or shut down, 3 when the guest crashed (triple fault, KVM internal
error). Control it with 'cube vmm ctl --socket PATH <status|metrics|pause|resume|stop>'.
With --jail the VMM re-executes itself in new mount/net/IPC/UTS namespaces
and its own cgroup (see docs/vmm.md).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, d := range disks {
				pd, err := vmmapi.ParseDisk(d)
				if err != nil {
					return errs.Wrap(errs.InvalidArgument, err, "--disk")
				}
				o.Disks = append(o.Disks, pd)
			}
			cfg, err := loadConfig()
			if err != nil {
				return err
			}
			log := newLogger(cfg).With("component", "vmm")
			if jailed {
				return runJailed(cmd.Context(), o, uid, gid, log)
			}
			return runVMM(o, privateMounts, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Kernel, "kernel", "", "kernel image: bzImage, vmlinux ELF (PVH), or raw synthetic code")
	f.StringVar(&o.KernelFormat, "kernel-format", "auto", "auto, bzimage, elf or raw")
	f.StringVar(&o.Initrd, "initrd", "", "initrd / initramfs (optional)")
	f.StringVar(&o.Cmdline, "cmdline", "console=ttyS0 reboot=k panic=-1", "kernel command line (virtio_mmio.device= entries are added)")
	f.IntVar(&o.MemMiB, "mem", 256, "guest RAM in MiB")
	f.IntVar(&o.VCPUs, "vcpus", 1, "number of vCPUs")
	f.StringArrayVar(&disks, "disk", nil, "virtio-blk disk: base=IMAGE[,overlay=FILE][,id=ID] (repeatable)")
	f.StringVar(&o.TapName, "tap", "", "tap interface for virtio-net (opened by name)")
	f.IntVar(&o.TapFD, "tap-fd", 0, "inherited tap fd for virtio-net")
	f.StringVar(&o.MAC, "mac", "", "guest MAC address")
	f.StringVar(&o.VsockUDS, "vsock-uds", "", "host unix socket path of the virtio-vsock bridge")
	f.Uint32Var(&o.VsockCID, "vsock-cid", 3, "guest vsock CID")
	f.BoolVar(&o.RNG, "rng", false, "add a virtio-rng device")
	f.StringVar(&o.SerialLog, "serial-log", "", "guest console output: file path, '-' for stdout, empty to discard")
	f.StringVar(&o.APISocket, "api-socket", "", "control socket path")
	f.IntVar(&o.APIFD, "api-fd", 0, "inherited listening control socket fd")
	f.IntVar(&o.KVMFD, "kvm-fd", 0, "inherited /dev/kvm fd")
	f.StringVar(&o.MemFile, "mem-file", "", "map guest RAM from this file (MAP_PRIVATE unless --mem-file-shared)")
	f.BoolVar(&o.MemFileShared, "mem-file-shared", false, "map --mem-file shared (guest writes reach the file)")
	f.BoolVar(&o.NoStart, "no-start", false, "create the VM but run it only on POST /start")
	f.StringVar(&o.ResultFile, "result-file", "", "write the final result (JSON) here")
	f.StringVar(&o.Cgroup, "cgroup", "", "create and join cgroup cube-vmm/NAME (v1 cpu, memory, pids)")
	f.BoolVar(&o.NoSeccomp, "no-seccomp", false, "do not install the seccomp filter")
	f.BoolVar(&privateMounts, "private-mounts", false, "make all mounts private (set by the launcher in a new mount namespace)")
	f.BoolVar(&jailed, "jail", false, "re-execute in new namespaces and a cgroup (needs --api-socket)")
	f.IntVar(&uid, "uid", 0, "with --jail: run the VMM as this uid")
	f.IntVar(&gid, "gid", 0, "with --jail: run the VMM as this gid")
	_ = f.MarkHidden("private-mounts")
	cmd.AddCommand(newVMMCtlCmd(), newVMMSynthCmd())
	return cmd
}

func newVMMSynthCmd() *cobra.Command {
	var msg string
	var crash bool
	cmd := &cobra.Command{
		Use:   "synth-guest OUTFILE",
		Short: "Write a synthetic raw guest (for --kernel-format raw): prints a line on COM1, then counts forever at CPL 3",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			img := synth.Hello(msg + "\n")
			if crash {
				img = synth.TripleFault(msg + "\n")
			}
			if err := os.WriteFile(args[0], img, 0o644); err != nil {
				return errs.Wrap(errs.Internal, err, "write guest")
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&msg, "message", "cube synthetic guest", "line the guest prints")
	cmd.Flags().BoolVar(&crash, "triple-fault", false, "triple-fault after printing instead of looping")
	return cmd
}

// runJailed re-executes the VMM through vmmapi.Launch and relays its fate.
func runJailed(ctx context.Context, o vmmapi.Options, uid, gid int, log *slog.Logger) error {
	if o.APISocket == "" {
		return errs.E(errs.InvalidArgument, "--jail needs --api-socket")
	}
	name := o.Cgroup
	if name == "" {
		name = "vmm-" + strconv.Itoa(os.Getpid())
	}
	sock := o.APISocket
	o.Cgroup = ""
	p, err := vmmapi.Launch(ctx, vmmapi.LaunchConfig{
		Options: o, Socket: sock, Isolate: true, UID: uid, GID: gid, Cgroup: name,
		Stdout: os.Stdout, Stderr: os.Stderr,
	})
	if err != nil {
		return errs.Wrap(errs.Internal, err, "launch vmm")
	}
	log.Info("vmm launched", "pid", p.PID(), "socket", sock, "cgroup", name)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-p.Done():
	case s := <-sig:
		p.Cmd.Process.Signal(s)
		<-p.Done()
	}
	var ee *exec.ExitError
	if err := p.Wait(context.Background()); err != nil {
		if errors.As(err, &ee) {
			os.Exit(ee.ExitCode())
		}
		return errs.Wrap(errs.Internal, err, "vmm")
	}
	return nil
}

// serialLogMax bounds what a guest can write to the console log, so a
// guest printing forever cannot fill the host's disk.
const serialLogMax = 64 << 20

// cappedWriter passes through up to left bytes, then drops the rest
// (with one marker line).
type cappedWriter struct {
	mu   sync.Mutex
	w    io.Writer
	left int64
}

func (c *cappedWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.left <= 0 {
		return len(p), nil
	}
	n := int64(len(p))
	if n > c.left {
		n = c.left
	}
	_, err := c.w.Write(p[:n])
	c.left -= n
	if c.left <= 0 {
		_, _ = io.WriteString(c.w, "\n[cube vmm: console log limit reached, further output dropped]\n")
	}
	return len(p), err
}

// vmmController adapts a machine to the control API.
type vmmController struct {
	m       *machine.Machine
	statm   *os.File // /proc/self/statm, opened before seccomp
	mu      sync.Mutex
	started bool
}

func (c *vmmController) Start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return errs.E(errs.Conflict, "vm already started")
	}
	if err := c.m.VM.Start(); err != nil {
		return errs.Wrap(errs.Conflict, err, "start")
	}
	c.started = true
	return nil
}

func (c *vmmController) Pause() error {
	if err := c.m.VM.Pause(); err != nil {
		return errs.Wrap(errs.Conflict, err, "pause")
	}
	return nil
}

func (c *vmmController) Resume() error {
	if err := c.m.VM.Resume(); err != nil {
		return errs.Wrap(errs.Conflict, err, "resume")
	}
	return nil
}

func (c *vmmController) Stop() error {
	c.m.VM.Stop()
	return nil
}

func toAPIResult(r vm.Result) *vmmapi.Result {
	return &vmmapi.Result{Outcome: string(r.Outcome), Reason: r.Reason, VCPU: r.VCPU, RIP: r.RIP}
}

func (c *vmmController) Status() vmmapi.Status {
	s := vmmapi.Status{State: c.m.VM.State().String(), PID: os.Getpid(), Cmdline: c.m.Cmdline}
	if t := c.m.VM.Metrics.StartedAt(); !t.IsZero() {
		s.Uptime = time.Since(t).Seconds()
	}
	select {
	case <-c.m.VM.Done():
		s.Result = toAPIResult(c.m.VM.Wait())
	default:
	}
	return s
}

func (c *vmmController) VCPUs() ([]vmmapi.VCPURegs, error) { return vmmapi.ReadVCPUs(c.m.VM) }

func (c *vmmController) Metrics() vmmapi.Metrics {
	out := vmmapi.Metrics{Snapshot: c.m.VM.MetricsSnapshot()}
	if c.statm != nil {
		var b [128]byte
		if n, err := c.statm.ReadAt(b[:], 0); n > 0 && (err == nil || err == io.EOF) {
			if fs := strings.Fields(string(b[:n])); len(fs) > 1 {
				pages, _ := strconv.ParseUint(fs[1], 10, 64)
				out.RSSBytes = pages * uint64(os.Getpagesize())
			}
		}
	}
	return out
}

func runVMM(o vmmapi.Options, privateMounts bool, log *slog.Logger) error {
	var leaver *jail.Leaver
	if o.Cgroup != "" {
		cg, err := jail.CreateCgroup(o.Cgroup, vmmapi.Limits(o))
		if err != nil {
			return errs.Wrap(errs.FailedPrecondition, err, "cgroup")
		}
		if err := cg.Add(os.Getpid()); err != nil {
			cg.Remove()
			return errs.Wrap(errs.FailedPrecondition, err, "cgroup")
		}
		if leaver, err = cg.PrepareLeave(); err != nil {
			return errs.Wrap(errs.FailedPrecondition, err, "cgroup")
		}
	}
	if privateMounts {
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return errs.Wrap(errs.FailedPrecondition, err, "make mounts private")
		}
	}
	code, err := vmmMain(o, log)
	if leaver != nil {
		if lerr := leaver.Leave(); lerr != nil {
			log.Warn("cgroup clean-up", "err", lerr)
		}
	}
	if err != nil {
		return err
	}
	if code != 0 {
		os.Exit(code)
	}
	return nil
}

// vmmMain runs the VM to its end and returns the process exit code.
func vmmMain(o vmmapi.Options, log *slog.Logger) (int, error) {
	if o.Kernel == "" {
		return 0, errs.E(errs.InvalidArgument, "--kernel is required")
	}
	if o.MemMiB < 2 || o.MemMiB > 1<<20 {
		return 0, errs.E(errs.InvalidArgument, "--mem %d MiB out of range", o.MemMiB)
	}
	if o.VCPUs < 1 || o.VCPUs > vm.MaxVCPUs {
		return 0, errs.E(errs.InvalidArgument, "--vcpus %d out of range 1..%d", o.VCPUs, vm.MaxVCPUs)
	}
	kernel, err := machine.ReadFile(o.Kernel, 512<<20)
	if err != nil {
		return 0, errs.Wrap(errs.InvalidArgument, err, "kernel")
	}
	var initrd []byte
	if o.Initrd != "" {
		if initrd, err = machine.ReadFile(o.Initrd, 2<<30); err != nil {
			return 0, errs.Wrap(errs.InvalidArgument, err, "initrd")
		}
	}
	var serialOut io.Writer
	switch o.SerialLog {
	case "":
	case "-":
		// A reader that went away must not kill the VMM with SIGPIPE.
		signal.Ignore(syscall.SIGPIPE)
		serialOut = &cappedWriter{w: os.Stdout, left: serialLogMax}
	default:
		f, err := os.OpenFile(o.SerialLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			return 0, errs.Wrap(errs.InvalidArgument, err, "serial log")
		}
		defer f.Close()
		serialOut = &cappedWriter{w: f, left: serialLogMax}
	}
	var resultFile *os.File
	if o.ResultFile != "" {
		if resultFile, err = os.OpenFile(o.ResultFile, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640); err != nil {
			return 0, errs.Wrap(errs.InvalidArgument, err, "result file")
		}
		defer resultFile.Close()
	}
	virt, err := virtioDevices(o, log)
	if err != nil {
		return 0, err
	}
	memMode := vm.MemAnonymous
	if o.MemFile != "" {
		memMode = vm.MemFilePrivate
		if o.MemFileShared {
			memMode = vm.MemFileShared
		}
	}
	m, err := machine.New(machine.Spec{
		Kernel: kernel, KernelFormat: boot.Format(o.KernelFormat), Initrd: initrd, Cmdline: o.Cmdline,
		MemSize: uint64(o.MemMiB) << 20, VCPUs: o.VCPUs, MemMode: memMode, MemFile: o.MemFile,
		KVMFD: o.KVMFD, Serial: serialOut, Virtio: virt, Log: log,
	})
	if err != nil {
		return 0, errs.Wrap(errs.FailedPrecondition, err, "create vm")
	}
	defer m.VM.Close()

	var l net.Listener
	var ownSocket string
	switch {
	case o.APIFD > 0:
		f := os.NewFile(uintptr(o.APIFD), "api")
		l, err = net.FileListener(f)
		f.Close()
	case o.APISocket != "":
		_ = os.Remove(o.APISocket)
		l, err = net.Listen("unix", o.APISocket)
		if err == nil {
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			ownSocket = o.APISocket
			err = os.Chmod(o.APISocket, 0o600)
		}
	}
	if err != nil {
		return 0, errs.Wrap(errs.FailedPrecondition, err, "control socket")
	}
	statm, _ := os.Open("/proc/self/statm")
	if statm != nil {
		defer statm.Close()
	}
	ctl := &vmmController{m: m, statm: statm}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sig)

	log.Info("vmm running", "pid", os.Getpid(), "mem_mib", o.MemMiB, "vcpus", o.VCPUs, "cmdline", m.Cmdline, "autostart", !o.NoStart)
	if !o.NoSeccomp {
		if err := jail.Install(); err != nil {
			return 0, errs.Wrap(errs.FailedPrecondition, err, "seccomp")
		}
	}
	var srv *vmmapi.Server
	if l != nil {
		srv = vmmapi.NewServer(ctl, log)
		go func() {
			if err := srv.Serve(l); err != nil {
				log.Error("control socket", "err", err)
			}
		}()
	}
	if !o.NoStart {
		if err := ctl.Start(); err != nil {
			return 0, err
		}
	}
	select {
	case <-m.VM.Done():
	case s := <-sig:
		log.Info("signal, stopping", "signal", s.String())
		m.VM.Stop()
	}
	r := m.VM.Wait()
	log.Info("vm stopped", "outcome", r.Outcome, "reason", r.Reason, "vcpu", r.VCPU, "rip", fmt.Sprintf("%#x", r.RIP))
	if resultFile != nil {
		b, _ := json.Marshal(toAPIResult(r))
		resultFile.Write(append(b, '\n'))
	}
	if srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		srv.Shutdown(ctx)
		cancel()
	}
	if ownSocket != "" {
		os.Remove(ownSocket)
	}
	if r.Outcome == vm.OutcomeCrashed {
		return vmmapi.ExitCrashed, nil
	}
	return 0, nil
}

func newVMMCtlCmd() *cobra.Command {
	var socket string
	cmd := &cobra.Command{
		Use:   "ctl <status|metrics|start|pause|resume|stop|METHOD /path>",
		Short: "Talk to a running `cube vmm` over its control socket",
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if socket == "" {
				return errs.E(errs.InvalidArgument, "--socket is required")
			}
			c := vmmapi.NewClient(socket)
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			method, path := "GET", "/"+args[0]
			switch args[0] {
			case "status", "metrics":
			case "start", "pause", "resume", "stop":
				method = "POST"
			default:
				if len(args) != 2 {
					return errs.E(errs.InvalidArgument, "unknown action %q", args[0])
				}
				method, path = strings.ToUpper(args[0]), args[1]
			}
			raw, err := c.Do(ctx, method, path)
			if err != nil {
				return err
			}
			var v any
			_ = json.Unmarshal(raw, &v)
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(v)
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "the VMM's control socket")
	return cmd
}
