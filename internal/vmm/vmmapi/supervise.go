//go:build linux

package vmmapi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/jail"
)

// SetSubreaper makes this process the child subreaper of its
// descendants (PR_SET_CHILD_SUBREAPER): orphans are reparented to it
// instead of init. The runtime does not need it (a jailed VMM is created
// as its child: LaunchConfig.Detach); a test that kills a runtime
// process uses it to stand in for the service manager that adopts and
// reaps that runtime's VMMs.
func SetSubreaper() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
}

// Exit is how a supervised VMM ended.
type Exit struct {
	// Reaped: this process reaped the VMM (it was its child, directly or
	// as subreaper), so Code and Signal are known. Otherwise another
	// process (init, an older runtime's subreaper) reaps it.
	Reaped bool
	Code   int
	Signal syscall.Signal // non-zero when killed by a signal
}

func (e Exit) String() string {
	switch {
	case !e.Reaped:
		return "exited (reaped elsewhere)"
	case e.Signal != 0:
		return fmt.Sprintf("killed by signal %d (%s)", int(e.Signal), e.Signal)
	default:
		return fmt.Sprintf("exit code %d", e.Code)
	}
}

// Supervised is a VMM process watched through a pidfd: its exit is seen
// by the Go netpoller (no thread blocked per VMM), signals go through the
// pidfd (never to a recycled pid), and when it exits it is reaped (if it
// is this process's child) and its cgroup is removed.
type Supervised struct {
	pid    int
	f      *os.File // the pidfd (non-blocking)
	cg     *jail.Cgroup
	socket string
	done   chan struct{}
	exit   Exit
}

// Supervise watches pid. cg and socket (either may be empty) are
// removed once it has exited.
// The pid must be this process's child (not yet reaped), or a process
// that cannot have been reaped and recycled yet (checked by the caller
// through its control socket).
func Supervise(pid int, cg *jail.Cgroup, socket string) (*Supervised, error) {
	fd, err := unix.PidfdOpen(pid, unix.O_NONBLOCK)
	if errors.Is(err, unix.EINVAL) {
		// Before Linux 5.10 (no PIDFD_NONBLOCK): a blocking pidfd; the
		// watch below then falls back to a blocking wait.
		fd, err = unix.PidfdOpen(pid, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	s := &Supervised{pid: pid, f: os.NewFile(uintptr(fd), "pidfd:"+fmt.Sprint(pid)), cg: cg, socket: socket, done: make(chan struct{})}
	rc, err := s.f.SyscallConn()
	if err != nil {
		s.f.Close()
		return nil, err
	}
	go func() {
		var exit Exit
		// Read's callback runs now and again each time the pidfd is
		// readable, i.e. once the process has exited.
		rerr := rc.Read(func(fd uintptr) bool {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if n, err := unix.Poll(pfd, 0); err != nil || n == 0 {
				return false
			}
			var info unix.Siginfo
			err := unix.Waitid(unix.P_PIDFD, int(fd), &info, unix.WEXITED|unix.WNOHANG, nil)
			switch {
			case errors.Is(err, unix.ECHILD):
				return true // not ours: whoever is its parent reaps it
			case err != nil:
				return false
			}
			exit = siginfoExit(&info)
			return exit.Reaped
		})
		if rerr != nil {
			// The pidfd is not pollable (cannot happen on kernels with
			// pidfd_open): a blocking wait (ours), else poll /proc.
			var info unix.Siginfo
			if err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED, nil); err == nil {
				exit = siginfoExit(&info)
			}
			for !exit.Reaped && processAlive(pid) {
				time.Sleep(10 * time.Millisecond)
			}
		}
		s.exit = exit
		if s.cg != nil {
			removeCgroup(s.cg)
		}
		if s.socket != "" {
			_ = os.Remove(s.socket)
		}
		s.f.Close()
		close(s.done)
	}()
	return s, nil
}

// siginfoExit decodes a waitid result (siginfo_t: si_pid, si_uid,
// si_status after the three ints and padding).
func siginfoExit(info *unix.Siginfo) Exit {
	b := (*[128]byte)(unsafe.Pointer(info))
	pid := int32(binary.NativeEndian.Uint32(b[16:]))
	status := int(int32(binary.NativeEndian.Uint32(b[24:])))
	if pid == 0 {
		return Exit{}
	}
	switch info.Code {
	case 2, 3: // CLD_KILLED, CLD_DUMPED
		return Exit{Reaped: true, Signal: syscall.Signal(status)}
	default: // CLD_EXITED
		return Exit{Reaped: true, Code: status}
	}
}

// removeCgroup removes an exited VMM's cgroup, retrying briefly (the
// kernel may still be tearing down its last threads).
func removeCgroup(cg *jail.Cgroup) {
	for i := 0; i < 50; i++ {
		if cg.Remove() == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// processAlive: /proc/PID exists and is not a zombie.
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	for i := len(b) - 1; i > 0; i-- {
		if b[i] == ')' {
			return i+2 >= len(b) || b[i+2] != 'Z'
		}
	}
	return true
}

// PID is the supervised process id.
func (s *Supervised) PID() int { return s.pid }

// Done is closed once the process has exited, was reaped (if ours) and
// its cgroup removed.
func (s *Supervised) Done() <-chan struct{} { return s.done }

// Exited reports whether Done is closed.
func (s *Supervised) Exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Exit is how it ended (valid once Done is closed).
func (s *Supervised) Exit() Exit {
	<-s.done
	return s.exit
}

// Signal sends sig through the pidfd (a no-op once it has exited).
func (s *Supervised) Signal(sig syscall.Signal) error {
	if s.Exited() {
		return nil
	}
	rc, err := s.f.SyscallConn()
	if err != nil {
		return nil // closed: it has exited
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.PidfdSendSignal(int(fd), sig, nil, 0)
	}); err != nil {
		return nil
	}
	if errors.Is(serr, unix.ESRCH) {
		return nil
	}
	return serr
}

// Kill sends SIGKILL and waits up to d for the clean-up.
func (s *Supervised) Kill(d time.Duration) bool {
	_ = s.Signal(syscall.SIGKILL)
	return s.WaitFor(d)
}

// WaitFor waits up to d for Done.
func (s *Supervised) WaitFor(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.done:
		return true
	case <-t.C:
		return false
	}
}
