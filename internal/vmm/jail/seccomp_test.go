//go:build linux && amd64

package jail

import (
	"errors"
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
	case "snapshot":
		// The vmm-restore filter: snapshot files can be created, written,
		// linked and renamed; nothing can be opened for reading.
		dir := os.Getenv("JAIL_TEST_DIR")
		if err := InstallSnapshot(); err != nil {
			println("install:", err.Error())
			os.Exit(10)
		}
		if err := os.MkdirAll(dir+"/snap", 0o755); err != nil {
			println("mkdir:", err.Error())
			os.Exit(11)
		}
		f, err := os.OpenFile(dir+"/snap/memory.tmp", os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
		if err != nil {
			println("create:", err.Error())
			os.Exit(12)
		}
		f.Write([]byte("pages"))
		f.Sync()
		f.Close()
		if err := os.Rename(dir+"/snap/memory.tmp", dir+"/snap/memory"); err != nil {
			println("rename:", err.Error())
			os.Exit(13)
		}
		if err := os.Link(dir+"/snap/memory", dir+"/snap/linked"); err != nil {
			println("link:", err.Error())
			os.Exit(14)
		}
		if err := os.Symlink(dir+"/snap/memory", dir+"/snap/sym"); err != nil {
			println("symlink:", err.Error())
			os.Exit(15)
		}
		if err := os.Remove(dir + "/snap/sym"); err != nil {
			println("unlink:", err.Error())
			os.Exit(16)
		}
		for _, flags := range []int{os.O_RDONLY, os.O_RDWR, os.O_RDWR | os.O_CREATE, os.O_WRONLY} {
			if _, err := os.OpenFile(dir+"/snap/memory", flags, 0); !errors.Is(err, unix.EPERM) {
				println("open flags", flags, "not refused:", err)
				os.Exit(17)
			}
		}
		if _, err := unix.Open(dir+"/snap", unix.O_PATH|unix.O_WRONLY|unix.O_CREAT, 0); err != unix.EPERM {
			println("O_PATH not refused:", err)
			os.Exit(18)
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

func runChild(t *testing.T, mode string, env ...string) (string, error) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "JAIL_TEST_CHILD="+mode), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestSeccompAllowsAndRefuses(t *testing.T) {
	out, err := runChild(t, "basic")
	if err != nil || !strings.Contains(out, "ok\n") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func TestSeccompSnapshotFilter(t *testing.T) {
	dir := t.TempDir()
	out, err := runChild(t, "snapshot", "JAIL_TEST_DIR="+dir)
	if err != nil || !strings.Contains(out, "ok\n") {
		t.Fatalf("child: %v\n%s", err, out)
	}
	b, err := os.ReadFile(dir + "/snap/linked")
	if err != nil || string(b) != "pages" {
		t.Fatalf("linked file: %q %v", b, err)
	}
	// cube vmm's own filter still refuses creating files.
	out, err = runChild(t, "basic")
	if err != nil || !strings.Contains(out, "ok\n") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func TestLimitFilesSpec(t *testing.T) {
	dir := t.TempDir()
	open := func(n string) *os.File {
		f, err := os.Create(dir + "/" + n)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	l := &LimitFiles{Mem: open("mem"), CPU: open("cpu")}
	if got := l.Spec(5); got != "v1,mem=5,cpu=6" {
		t.Fatalf("spec %q", got)
	}
	if err := l.Apply(Limits{MemoryBytes: 1 << 30, PidsMax: 7, CPUs: 1.5}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	for n, want := range map[string]string{"mem": "1073741824", "cpu": "150000"} {
		if b, _ := os.ReadFile(dir + "/" + n); string(b) != want {
			t.Errorf("%s = %q, want %q", n, b, want)
		}
	}
	for _, bad := range []string{"", "v3", "v1,mem=x", "v1,mem=1", "v2,disk=5"} {
		if _, err := ParseLimitFDs(bad); err == nil {
			t.Errorf("ParseLimitFDs(%q) accepted", bad)
		}
	}
	// Adopting real fds is covered by the jailed vmm-restore process
	// test (internal/vmm/snapshot).
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
