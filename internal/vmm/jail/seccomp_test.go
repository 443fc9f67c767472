//go:build linux && amd64

package jail

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// The filter is tested in a child process (the test binary re-executed)
// because a seccomp filter cannot be removed.
func TestMain(m *testing.M) {
	switch os.Getenv("JAIL_TEST_CHILD") {
	case "":
		os.Exit(m.Run())
	case "basic":
		if err := Install(); err != nil {
			println("install:", err.Error())
			os.Exit(10)
		}
		// Allowed: write, getpid, threads (goroutines on new Ms), pipes.
		os.Stdout.WriteString("installed\n")
		done := make(chan int)
		for i := 0; i < 8; i++ {
			go func() {
				var p [2]int
				unix.Pipe2(p[:], unix.O_CLOEXEC)
				unix.Close(p[0])
				unix.Close(p[1])
				done <- unix.Getpid()
			}()
		}
		for i := 0; i < 8; i++ {
			<-done
		}
		// Refused with EPERM: open, inet sockets, non-KVM ioctls.
		if _, err := os.Open("/etc/hostname"); err == nil || !strings.Contains(err.Error(), "operation not permitted") {
			println("open not refused:", err)
			os.Exit(11)
		}
		if _, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0); err != unix.EPERM {
			println("inet socket not refused")
			os.Exit(12)
		}
		if fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0); err != nil {
			println("unix socket refused")
			os.Exit(13)
		} else {
			unix.Close(fd)
		}
		if _, err := unix.IoctlGetInt(1, unix.BLKGETSIZE64); err != unix.EPERM {
			println("block ioctl not refused:", err)
			os.Exit(14)
		}
		os.Stdout.WriteString("ok\n")
		os.Exit(0)
	case "exec":
		if err := Install(); err != nil {
			os.Exit(10)
		}
		unix.Exec("/bin/true", []string{"true"}, nil)
		os.Exit(20) // not reached: execve kills the process
	}
}

func runChild(t *testing.T, mode string) (string, error) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "JAIL_TEST_CHILD="+mode)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestSeccompAllowsAndRefuses(t *testing.T) {
	out, err := runChild(t, "basic")
	if err != nil || !strings.Contains(out, "ok\n") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func TestSeccompKillsExec(t *testing.T) {
	out, err := runChild(t, "exec")
	ee, ok := err.(*exec.ExitError)
	if !ok {
		t.Fatalf("child: %v\n%s", err, out)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() || ws.Signal() != syscall.SIGSYS {
		t.Fatalf("child exited %v, want killed by SIGSYS\n%s", ws, out)
	}
}

func TestProgramShape(t *testing.T) {
	p := Program()
	if len(p) > 4096 {
		t.Fatalf("filter has %d instructions (kernel limit 4096)", len(p))
	}
	for i, ins := range p {
		if ins.Code&0x07 == unix.BPF_JMP && int(ins.Jt)+i+1 >= len(p) {
			t.Fatalf("instruction %d jumps out of the program", i)
		}
	}
}
