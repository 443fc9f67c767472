//go:build linux && amd64

// Package jail hardens a VMM process: a seccomp-BPF allow-list filter,
// cgroup v1 (and v2 where mounted with controllers) membership with
// limits, and helpers for the namespaces the launcher puts it in. The
// filter policy is documented in docs/vmm.md.
package jail

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// seccomp_data offsets.
const (
	offNr   = 0
	offArch = 4
	offArg0 = 16
	offArg1 = 24
	offArg2 = 32

	auditArchX8664 = 0xC000003E
	x32SyscallBit  = 0x40000000

	retAllow       = 0x7fff0000 // SECCOMP_RET_ALLOW
	retKillProcess = 0x80000000 // SECCOMP_RET_KILL_PROCESS
	retErrno       = 0x00050000 // SECCOMP_RET_ERRNO | errno
)

// Allowed are the syscalls a running VMM makes: Go runtime (threads,
// memory, signals, timers, netpoll), KVM and device I/O on fds opened
// before the filter, the control socket, and exit clean-up. Syscalls
// with argument checks (ioctl, clone, socket) are handled separately.
var Allowed = []uintptr{
	// file-descriptor I/O (serial log, disks, tap, eventfds, sockets)
	unix.SYS_READ, unix.SYS_WRITE, unix.SYS_READV, unix.SYS_WRITEV,
	unix.SYS_PREAD64, unix.SYS_PWRITE64, unix.SYS_PREADV, unix.SYS_PWRITEV,
	unix.SYS_LSEEK, unix.SYS_CLOSE, unix.SYS_FSTAT, unix.SYS_NEWFSTATAT,
	unix.SYS_FSYNC, unix.SYS_FDATASYNC, unix.SYS_FALLOCATE, unix.SYS_FTRUNCATE,
	unix.SYS_FCNTL, unix.SYS_DUP, unix.SYS_DUP3, unix.SYS_PIPE2, unix.SYS_EVENTFD2,
	// memory (Go heap and stacks; guest RAM is mapped before the filter)
	unix.SYS_MMAP, unix.SYS_MUNMAP, unix.SYS_MPROTECT, unix.SYS_MADVISE, unix.SYS_MREMAP,
	// threads, scheduling, time
	unix.SYS_FUTEX, unix.SYS_SCHED_YIELD, unix.SYS_NANOSLEEP, unix.SYS_CLOCK_NANOSLEEP,
	unix.SYS_CLOCK_GETTIME, unix.SYS_GETTIMEOFDAY, unix.SYS_SCHED_GETAFFINITY,
	unix.SYS_GETPID, unix.SYS_GETTID, unix.SYS_TGKILL, unix.SYS_EXIT, unix.SYS_EXIT_GROUP,
	unix.SYS_RESTART_SYSCALL, unix.SYS_GETUID, unix.SYS_GETEUID, unix.SYS_GETGID, unix.SYS_GETEGID,
	// threads started by glibc (cgo builds): restartable sequences, robust futexes
	unix.SYS_RSEQ, unix.SYS_SET_ROBUST_LIST,
	// signals (Go runtime; vCPU kicks are tgkill to our own threads)
	unix.SYS_RT_SIGACTION, unix.SYS_RT_SIGPROCMASK, unix.SYS_RT_SIGRETURN, unix.SYS_SIGALTSTACK,
	// netpoll and sockets (control socket, vsock bridge to host unix sockets)
	unix.SYS_EPOLL_CREATE1, unix.SYS_EPOLL_CTL, unix.SYS_EPOLL_WAIT, unix.SYS_EPOLL_PWAIT, unix.SYS_EPOLL_PWAIT2,
	unix.SYS_ACCEPT, unix.SYS_ACCEPT4, unix.SYS_CONNECT, unix.SYS_GETSOCKNAME, unix.SYS_GETPEERNAME,
	unix.SYS_SETSOCKOPT, unix.SYS_GETSOCKOPT, unix.SYS_SHUTDOWN,
	unix.SYS_SENDTO, unix.SYS_RECVFROM, unix.SYS_SENDMSG, unix.SYS_RECVMSG,
	// virtio-rng
	unix.SYS_GETRANDOM,
	// exit clean-up: unlink the control socket, remove our cgroup
	unix.SYS_UNLINKAT, unix.SYS_RMDIR,
}

// SnapshotAllowed are added to Allowed by the snapshot filter
// (SnapshotProgram, `cube vmm-restore`): writing a snapshot directory
// creates it (mkdirat), writes each file as NAME.tmp and renames it into
// place (renameat), and a diff snapshot links the base memory file and
// older layers into the new directory (linkat; symlinkat when they are
// on another filesystem). Files are created with openat, which is
// argument-checked: see SnapshotProgram.
// getcwd resolves a relative snapshot path (filepath.Abs).
var SnapshotAllowed = []uintptr{unix.SYS_MKDIRAT, unix.SYS_RENAMEAT, unix.SYS_LINKAT, unix.SYS_SYMLINKAT, unix.SYS_GETCWD}

// OpenatCreateWriteOnly is the only openat the snapshot filter lets
// through: flags & (O_ACCMODE|O_CREAT|O_PATH) must equal O_WRONLY|O_CREAT
// (a new or truncated snapshot file). Reading any file by path, or
// opening one read-write, stays refused.
const OpenatCreateWriteOnly = unix.O_WRONLY | unix.O_CREAT

// Killed are syscalls a VMM never needs and an attacker wants: they kill
// the process instead of failing.
var Killed = []uintptr{
	unix.SYS_EXECVE, unix.SYS_EXECVEAT, unix.SYS_FORK, unix.SYS_VFORK, unix.SYS_PTRACE,
	unix.SYS_PROCESS_VM_READV, unix.SYS_PROCESS_VM_WRITEV,
	unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_PIVOT_ROOT, unix.SYS_CHROOT, unix.SYS_SETNS, unix.SYS_UNSHARE,
	unix.SYS_BPF, unix.SYS_PERF_EVENT_OPEN, unix.SYS_USERFAULTFD,
	unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE,
	unix.SYS_KEXEC_LOAD, unix.SYS_KEXEC_FILE_LOAD, unix.SYS_REBOOT, unix.SYS_SWAPON, unix.SYS_SWAPOFF,
	unix.SYS_KEYCTL, unix.SYS_ADD_KEY, unix.SYS_REQUEST_KEY, unix.SYS_OPEN_BY_HANDLE_AT,
}

type asm []unix.SockFilter

func (a *asm) stmt(code uint16, k uint32) { *a = append(*a, unix.SockFilter{Code: code, K: k}) }
func (a *asm) jump(code uint16, k uint32, jt, jf uint8) {
	*a = append(*a, unix.SockFilter{Code: code, K: k, Jt: jt, Jf: jf})
}

const (
	ldW  = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
	jeqK = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
	jgeK = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
	andK = unix.BPF_ALU | unix.BPF_AND | unix.BPF_K
	retK = unix.BPF_RET | unix.BPF_K
)

// onNr emits "if nr == n { body }", body being at most 255 instructions.
func (a *asm) onNr(n uintptr, body asm) {
	a.jump(jeqK, uint32(n), 0, uint8(len(body)))
	*a = append(*a, body...)
	// body must end in a return; the accumulator is reloaded below.
}

// Program builds the filter of `cube vmm` (no new files).
func Program() []unix.SockFilter { return program(false) }

// SnapshotProgram builds the filter of `cube vmm-restore`: Program plus
// what writing full and diff snapshots needs (SnapshotAllowed, and openat
// restricted to OpenatCreateWriteOnly).
func SnapshotProgram() []unix.SockFilter { return program(true) }

func program(snapshots bool) []unix.SockFilter {
	var p asm
	eperm := uint32(retErrno | uint32(unix.EPERM))
	enosys := uint32(retErrno | uint32(unix.ENOSYS))
	p.stmt(ldW, offArch)
	p.jump(jeqK, auditArchX8664, 1, 0)
	p.stmt(retK, retKillProcess)
	p.stmt(ldW, offNr)
	p.jump(jgeK, x32SyscallBit, 0, 1)
	p.stmt(retK, retKillProcess)
	for _, n := range Allowed {
		p.jump(jeqK, uint32(n), 0, 1)
		p.stmt(retK, retAllow)
	}
	if snapshots {
		for _, n := range SnapshotAllowed {
			p.jump(jeqK, uint32(n), 0, 1)
			p.stmt(retK, retAllow)
		}
		p.onNr(unix.SYS_OPENAT, asm{
			{Code: ldW, K: offArg2},
			{Code: andK, K: unix.O_ACCMODE | unix.O_CREAT | unix.O_PATH},
			{Code: jeqK, K: OpenatCreateWriteOnly, Jt: 0, Jf: 1},
			{Code: retK, K: retAllow},
			{Code: retK, K: eperm},
		})
	}
	for _, n := range Killed {
		p.jump(jeqK, uint32(n), 0, 1)
		p.stmt(retK, retKillProcess)
	}
	// ioctl: KVM ('\xAE') and tty/tun ('T') request types only.
	p.onNr(unix.SYS_IOCTL, asm{
		{Code: ldW, K: offArg1},
		{Code: andK, K: 0xff00},
		{Code: jeqK, K: 0xAE00, Jt: 1},
		{Code: jeqK, K: 0x5400, Jt: 0, Jf: 1},
		{Code: retK, K: retAllow},
		{Code: retK, K: eperm},
	})
	// clone: threads only (CLONE_THREAD), never a new process.
	p.onNr(unix.SYS_CLONE, asm{
		{Code: ldW, K: offArg0},
		{Code: andK, K: unix.CLONE_THREAD},
		{Code: jeqK, K: unix.CLONE_THREAD, Jt: 0, Jf: 1},
		{Code: retK, K: retAllow},
		{Code: retK, K: eperm},
	})
	// clone3 cannot be argument-checked (its flags are in memory): make
	// callers fall back to clone.
	p.onNr(unix.SYS_CLONE3, asm{{Code: retK, K: enosys}})
	// socket: unix-domain only (vsock bridge to host unix sockets).
	p.onNr(unix.SYS_SOCKET, asm{
		{Code: ldW, K: offArg0},
		{Code: jeqK, K: unix.AF_UNIX, Jt: 0, Jf: 1},
		{Code: retK, K: retAllow},
		{Code: retK, K: eperm},
	})
	p.stmt(retK, eperm)
	return p
}

// Install sets no_new_privs and installs the filter on every thread of
// the process (SECCOMP_FILTER_FLAG_TSYNC).
func Install() error { return install(Program()) }

// InstallSnapshot installs SnapshotProgram like Install.
func InstallSnapshot() error { return install(SnapshotProgram()) }

func install(prog []unix.SockFilter) error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	fp := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	const setModeFilter, flagTSync = 1, 1
	r, _, e := unix.Syscall(unix.SYS_SECCOMP, setModeFilter, flagTSync, uintptr(unsafe.Pointer(&fp)))
	if e != 0 {
		return fmt.Errorf("seccomp: %w", e)
	}
	if r != 0 {
		return fmt.Errorf("seccomp: thread %d could not be synchronised", r)
	}
	return nil
}
