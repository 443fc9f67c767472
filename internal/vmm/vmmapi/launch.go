//go:build linux

package vmmapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/jail"
)

// LaunchConfig says how to start a VMM process.
type LaunchConfig struct {
	// Binary is the cube executable (default: this executable).
	Binary string
	// Options are the VMM's flags. Launch fills in APIFD, KVMFD and (when
	// TapName is set) TapFD itself.
	Options Options
	// Socket is the control socket path (required). Launch creates and
	// binds it, so it exists before the VMM runs: clients may connect at
	// once and are served when the VMM is ready.
	Socket string
	// Isolate puts the VMM in new mount, network, IPC and UTS namespaces.
	// Devices reach it only as fds (the tap is opened here).
	Isolate bool
	// UID/GID > 0 drop the VMM to that user; /dev/kvm, the tap and the
	// socket are passed as fds, but kernel, disks and the serial log must
	// be accessible to that user.
	UID, GID int
	// Cgroup names the VMM's cgroup (created with limits derived from the
	// options; removed by Wait). Empty: no cgroup of its own.
	Cgroup string
	// Stdout and Stderr receive the VMM's output (nil: discarded).
	Stdout, Stderr io.Writer
	// Env is extra environment for the VMM.
	Env []string
	// Subcommand, when set, replaces `vmm` and the Options' flags: the
	// VMM runs as `cube <Subcommand...> --api-fd=3 --kvm-fd=4
	// [--limit-fds=...]` (a pre-started `vmm-restore`, which learns its
	// guest on POST /restore). With a Cgroup, the cgroup's limit files are
	// passed as further fds (jail.LimitFiles) and the VMM sets its limits
	// itself once it knows its size. Options then only size GOMAXPROCS
	// and the cgroup's initial limits, and must not name a tap.
	Subcommand []string
	// SharedMounts keeps the copied mount table's propagation (no
	// --private-mounts), so the VMM sees mounts made after it started: a
	// pre-started VMM opens the tap in a network namespace bind-mounted
	// under /run/netns later. The VMM never mounts (its seccomp filter
	// kills mount), so nothing propagates back.
	SharedMounts bool
	// Detach makes the VMM a child of the launching process's parent
	// (CLONE_PARENT), not of the launching process, and gives it no
	// parent-death signal: `cube vmm-restore --jail` exits once its VMM
	// serves, and the VMM is already the child of whoever started the
	// launcher (the microVM runtime, which supervises it: Supervise). No
	// subreaper is involved, so the runtime inherits no other orphans.
	// The launcher watches it through a pidfd until it exits: if the VMM
	// dies first, Done closes and the cgroup and socket are removed, but
	// its exit status goes to its parent (Wait reports ErrDetachedExit).
	Detach bool
}

// Process is a running VMM.
type Process struct {
	Cmd    *exec.Cmd
	Client *Client
	cg     *jail.Cgroup
	socket string
	done   chan struct{}
	err    error
	pid    int
	sup    *Supervised // Detach: the pidfd watch
}

// ErrDetachedExit is Wait's error when a detached VMM (not the
// launcher's child) exited: its status went to its parent.
var ErrDetachedExit = errors.New("the detached VMM exited (its exit status went to its parent)")

// ExitCrashed is the VMM's exit code when its guest crashed.
const ExitCrashed = 3

// Limits derives cgroup limits from VMM options: guest RAM plus 256 MiB
// for the VMM itself, threads for the Go runtime and vCPUs, CPU quota of
// one CPU per vCPU.
func Limits(o Options) jail.Limits {
	mem := int64(o.MemMiB)
	if mem <= 0 {
		mem = 128
	}
	v := o.VCPUs
	if v <= 0 {
		v = 1
	}
	return jail.Limits{MemoryBytes: (mem + 256) << 20, PidsMax: 128 + 2*v, CPUs: float64(v)}
}

// OpenTap opens the tap interface name (IFF_TAP | IFF_NO_PI |
// IFF_VNET_HDR) as a file.
func OpenTap(name string) (*os.File, error) {
	fd, err := OpenTapFD(name)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "tap:"+name), nil
}

// OpenTapFD opens the tap interface name (IFF_TAP | IFF_NO_PI |
// IFF_VNET_HDR) and returns the raw fd (close-on-exec).
func OpenTapFD(name string) (int, error) {
	if name == "" || len(name) >= unix.IFNAMSIZ {
		return -1, fmt.Errorf("tap name %q: empty or too long", name)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	var ifr [unix.IFNAMSIZ + 24]byte
	copy(ifr[:], name)
	*(*uint16)(unsafe.Pointer(&ifr[unix.IFNAMSIZ])) = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&ifr[0]))); e != 0 {
		unix.Close(fd)
		return -1, fmt.Errorf("TUNSETIFF %s: %w", name, e)
	}
	return fd, nil
}

// Launch starts a VMM process.
func Launch(ctx context.Context, c LaunchConfig) (_ *Process, err error) {
	if c.Socket == "" {
		return nil, fmt.Errorf("launch: no control socket path")
	}
	bin := c.Binary
	if bin == "" {
		if bin, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	_ = os.Remove(c.Socket)
	l, err := net.Listen("unix", c.Socket)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	lf, err := ul.File()
	ul.Close()
	if err != nil {
		os.Remove(c.Socket)
		return nil, err
	}
	files = append(files, lf)
	defer func() {
		if err != nil {
			os.Remove(c.Socket)
		}
	}()
	if c.UID > 0 {
		if err := os.Chown(c.Socket, c.UID, c.GID); err != nil {
			return nil, err
		}
	}
	kvmf, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	files = append(files, kvmf)
	o := c.Options
	o.APISocket, o.APIFD, o.KVMFD = "", 3, 4
	if o.TapName != "" {
		tf, err := OpenTap(o.TapName)
		if err != nil {
			return nil, err
		}
		files = append(files, tf)
		o.TapName, o.TapFD = "", 3+len(files)-1
	}
	if o.Cgroup != "" {
		return nil, fmt.Errorf("launch: set LaunchConfig.Cgroup, not Options.Cgroup")
	}
	var cg *jail.Cgroup
	var startGate *os.File
	if c.Cgroup != "" {
		if cg, err = jail.CreateCgroup(c.Cgroup, Limits(o)); err != nil {
			return nil, err
		}
		defer func() {
			if err != nil {
				cg.Remove()
			}
		}()
	}
	args := append([]string{"vmm"}, o.Args()...)
	if c.Subcommand != nil {
		if c.Options.TapName != "" {
			return nil, fmt.Errorf("launch: a %s VMM opens its own tap", c.Subcommand[0])
		}
		args = append(append([]string(nil), c.Subcommand...), "--api-fd=3", "--kvm-fd=4")
		if cg != nil {
			lf, err := cg.OpenLimits()
			if err != nil {
				return nil, err
			}
			args = append(args, "--limit-fds="+lf.Spec(3+len(files)))
			files = append(files, lf.Files()...)
			// The VMM waits on this pipe until it is in its cgroup,
			// before it serves (or touches anything) at all.
			pr, pw, err := os.Pipe()
			if err != nil {
				return nil, err
			}
			args = append(args, "--start-fd="+strconv.Itoa(3+len(files)))
			files = append(files, pr)
			startGate = pw
			defer pw.Close()
		}
	}
	if c.Isolate && c.UID <= 0 && !c.SharedMounts {
		// Only root may change propagation; an unprivileged VMM keeps the
		// copied mount table as is.
		args = append(args, "--private-mounts")
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = c.Stdout, c.Stderr
	cmd.ExtraFiles = files
	// No cgroup-driven GOMAXPROCS updates: the runtime would re-read
	// cgroup files, which the seccomp filter refuses.
	// vCPU threads sit in KVM_RUN without holding a P; device goroutines
	// need a few.
	procs := max(2, min(o.VCPUs+1, 8))
	cmd.Env = append(append(os.Environ(), "GODEBUG=updatemaxprocs=0", "GOMAXPROCS="+strconv.Itoa(procs)), c.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if c.Isolate {
		cmd.SysProcAttr.Cloneflags = unix.CLONE_NEWNS | unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS
	}
	if c.Detach {
		cmd.SysProcAttr.Pdeathsig = 0
		cmd.SysProcAttr.Cloneflags |= unix.CLONE_PARENT
	}
	if c.UID > 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(c.UID), Gid: uint32(c.GID)}
	}
	if err = cmd.Start(); err != nil {
		return nil, fmt.Errorf("start vmm: %w", err)
	}
	p := &Process{Cmd: cmd, Client: NewClient(c.Socket), cg: cg, socket: c.Socket, done: make(chan struct{}), pid: cmd.Process.Pid}
	if cg != nil {
		// The VMM has not touched guest memory yet: joining now charges
		// everything that matters to its cgroup.
		if err = cg.Add(cmd.Process.Pid); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, err
		}
		if startGate != nil {
			startGate.Write([]byte{1})
		}
	}
	if c.Detach {
		// Not our child: watch it through a pidfd (its parent reaps it).
		sup, serr := Supervise(cmd.Process.Pid, nil, "")
		cmd.Process.Release()
		if serr != nil {
			syscall.Kill(p.pid, syscall.SIGKILL)
			if cg != nil {
				cg.Remove()
			}
			return nil, serr
		}
		p.sup = sup
		go func() {
			<-sup.Done()
			p.err = ErrDetachedExit
			if p.cg != nil {
				removeCgroup(p.cg)
			}
			_ = os.Remove(p.socket)
			close(p.done)
		}()
		return p, nil
	}
	go func() {
		p.err = cmd.Wait()
		if p.cg != nil {
			_ = p.cg.Remove()
		}
		_ = os.Remove(p.socket)
		close(p.done)
	}()
	return p, nil
}

// PID is the VMM's process id.
func (p *Process) PID() int { return p.pid }

// Signal sends sig to the VMM (through its pidfd when detached).
func (p *Process) Signal(sig syscall.Signal) error {
	if p.sup != nil {
		return p.sup.Signal(sig)
	}
	return p.Cmd.Process.Signal(sig)
}

// Done is closed when the process has exited and been cleaned up.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit. A guest crash is reported as an
// error with ExitCode ExitCrashed.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Kill kills the VMM and waits for clean-up.
func (p *Process) Kill() error {
	_ = p.Signal(syscall.SIGKILL)
	<-p.done
	return nil
}

// Stop asks the VMM to stop, then kills it if it has not exited within
// grace.
func (p *Process) Stop(ctx context.Context, grace time.Duration) error {
	sctx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	_, err := p.Client.Stop(sctx)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
		return errors.Join(err, fmt.Errorf("vmm pid %d killed after %s", p.PID(), grace))
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) && ee.ExitCode() != 0 {
		return fmt.Errorf("vmm exited with code %s", strconv.Itoa(ee.ExitCode()))
	}
	return nil
}
