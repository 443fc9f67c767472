//go:build linux

package vmmapi

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/synth"
)

var builtCube string

func TestMain(m *testing.M) {
	code := m.Run()
	if builtCube != "" {
		os.RemoveAll(filepath.Dir(builtCube))
	}
	os.Exit(code)
}

// cubeBinary returns the cube executable: $CUBE_BIN/cube (make test), or
// one built once into a world-readable temp dir (the uid-drop test execs
// it as nobody).
func cubeBinary(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("CUBE_BIN"); d != "" {
		if p := filepath.Join(d, "cube"); fileExists(p) {
			return p
		}
	}
	if builtCube != "" {
		return builtCube
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no cube binary: set CUBE_BIN to the directory holding cube (no go toolchain to build one)")
	}
	d, err := os.MkdirTemp("", "cube-bin-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	out := filepath.Join(d, "cube")
	cmd := exec.Command("go", "build", "-o", out, "github.com/cubesandbox/cube/cmd/cube")
	if b, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(d)
		t.Fatalf("build cube: %v\n%s", err, b)
	}
	builtCube = out
	return out
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// world makes a directory every uid can use (for the uid-drop test).
func world(t *testing.T) string {
	d, err := os.MkdirTemp("", "cube-vmm-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.Chmod(d, 0o777); err != nil {
		t.Fatal(err)
	}
	return d
}

func needKVM(t *testing.T) {
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
}

// vmmTest skips unless /dev/kvm (and, when jailed, root and cgroups) is
// usable, and returns the cube binary, a directory every uid can use and
// the path of guest written there as guest.bin.
func vmmTest(t *testing.T, jailed bool, guest []byte) (bin, dir, kernel string) {
	t.Helper()
	needKVM(t)
	if jailed {
		if os.Geteuid() != 0 {
			t.Skip("needs root (namespaces, cgroups, uid drop)")
		}
		if err := jail.CgroupsAvailable(); err != nil {
			t.Skipf("no usable cgroups: %v", err)
		}
	}
	bin = cubeBinary(t)
	dir = world(t)
	kernel = filepath.Join(dir, "guest.bin")
	if err := os.WriteFile(kernel, guest, 0o644); err != nil {
		t.Fatal(err)
	}
	return bin, dir, kernel
}

// launch starts a VMM process that is killed when the test ends.
func launch(t *testing.T, c LaunchConfig) *Process {
	t.Helper()
	p, err := Launch(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Kill() })
	return p
}

func waitFile(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %q, want it to contain %q", path, b, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestProcessLifecycle(t *testing.T) {
	bin, dir, kernel := vmmTest(t, false, synth.Hello("process guest up\n"))
	serial := filepath.Join(dir, "serial.log")
	result := filepath.Join(dir, "result.json")
	sock := filepath.Join(dir, "api.sock")
	ctx := context.Background()
	p := launch(t, LaunchConfig{
		Binary: bin, Socket: sock, Stderr: os.Stderr,
		Options: Options{Kernel: kernel, KernelFormat: "raw", MemMiB: 32, VCPUs: 1, SerialLog: serial, ResultFile: result, NoStart: true},
	})
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	st, err := p.Client.WaitReady(rctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.State != "created" || st.PID != p.PID() {
		t.Fatalf("status %+v", st)
	}
	if _, err := p.Client.Pause(rctx); err == nil {
		t.Fatal("pause of a created VM accepted")
	}
	if st, err = p.Client.Start(rctx); err != nil || st.State != "running" {
		t.Fatalf("start: %+v %v", st, err)
	}
	waitFile(t, serial, "process guest up\n")
	if st, err = p.Client.Pause(rctx); err != nil || st.State != "paused" {
		t.Fatalf("pause: %+v %v", st, err)
	}
	m, err := p.Client.Metrics(rctx)
	if err != nil || m.Exits["io"] < uint64(len("process guest up\n")) || m.Pauses != 1 || m.RSSBytes == 0 {
		t.Fatalf("metrics %+v %v", m, err)
	}
	if st, err = p.Client.Resume(rctx); err != nil || st.State != "running" {
		t.Fatalf("resume: %+v %v", st, err)
	}
	// A body-less snapshot request is refused (snapshots: internal/vmm/snapshot).
	if _, err := p.Client.Do(rctx, "POST", "/snapshot"); err == nil || !strings.Contains(err.Error(), "snapshot request") {
		t.Fatalf("snapshot: %v", err)
	}
	st, err = p.Client.Stop(rctx)
	if err != nil || st.Result == nil || st.Result.Outcome != "stopped" {
		t.Fatalf("stop: %+v %v", st, err)
	}
	if err := p.Wait(rctx); err != nil {
		t.Fatalf("exit: %v", err)
	}
	var r Result
	b, _ := os.ReadFile(result)
	if json.Unmarshal(b, &r) != nil || r.Outcome != "stopped" {
		t.Fatalf("result file %q", b)
	}
	if fileExists(sock) {
		t.Fatal("control socket left behind")
	}
}

func TestProcessCrashExitCode(t *testing.T) {
	bin, dir, kernel := vmmTest(t, false, synth.TripleFault("about to fault"))
	result := filepath.Join(dir, "result.json")
	p := launch(t, LaunchConfig{
		Binary: bin, Socket: filepath.Join(dir, "api.sock"),
		Options: Options{Kernel: kernel, KernelFormat: "raw", MemMiB: 32, VCPUs: 1, ResultFile: result},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := p.Wait(ctx)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != ExitCrashed {
		t.Fatalf("exit %v, want code %d", err, ExitCrashed)
	}
	b, _ := os.ReadFile(result)
	if !strings.Contains(string(b), `"crashed"`) || !strings.Contains(string(b), "triple fault") {
		t.Fatalf("result %s", b)
	}
}

// TestProcessHardening launches a jailed VMM (new namespaces, own cgroup,
// uid drop, seccomp) and inspects it through /proc.
func TestProcessHardening(t *testing.T) {
	bin, dir, kernel := vmmTest(t, true, synth.Hello("jailed guest up\n"))
	serial := filepath.Join(dir, "serial.log")
	cgName := "test-" + strconv.Itoa(os.Getpid())
	p := launch(t, LaunchConfig{
		Binary: bin, Socket: filepath.Join(dir, "api.sock"), Isolate: true, UID: 65534, GID: 65534, Cgroup: cgName,
		Stderr:  os.Stderr,
		Options: Options{Kernel: kernel, KernelFormat: "raw", MemMiB: 32, VCPUs: 2, SerialLog: serial},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := p.Client.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	waitFile(t, serial, "jailed guest up\n")
	proc := "/proc/" + strconv.Itoa(p.PID())

	status, _ := os.ReadFile(proc + "/status")
	for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	cg, _ := os.ReadFile(proc + "/cgroup")
	for _, ctrl := range []string{"cpu", "memory", "pids"} {
		found := false
		for _, line := range strings.Split(string(cg), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) == 3 && strings.Contains(","+parts[1]+",", ","+ctrl+",") && strings.HasSuffix(parts[2], "/cube-vmm/"+cgName) {
				found = true
			}
		}
		if !found {
			t.Errorf("not in cgroup cube-vmm/%s for %s:\n%s", cgName, ctrl, cg)
		}
	}
	for _, ns := range []string{"mnt", "net", "ipc", "uts"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		its, err := os.Readlink(proc + "/ns/" + ns)
		if err != nil || its == mine {
			t.Errorf("namespace %s: vmm %q, test %q (%v)", ns, its, mine, err)
		}
	}
	fds, err := os.ReadDir(proc + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	allowed := []string{"/dev/null", "/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu", "anon_inode:[eventfd]",
		"anon_inode:[eventpoll]", "anon_inode:[pidfd]", "socket:", "pipe:", serial, "/proc/", "/sys/fs/cgroup/"}
	for _, fd := range fds {
		target, _ := os.Readlink(proc + "/fd/" + fd.Name())
		ok := false
		for _, a := range allowed {
			if strings.HasPrefix(target, a) || strings.Contains(target, "kvm-vcpu") {
				ok = true
			}
		}
		if !ok {
			t.Errorf("vmm holds unexpected fd %s -> %s", fd.Name(), target)
		}
	}
	if err := p.Stop(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, ctrl := range []string{"cpu", "memory", "pids"} {
		matches, _ := filepath.Glob("/sys/fs/cgroup/" + ctrl + "/*/cube-vmm/" + cgName)
		m2, _ := filepath.Glob("/sys/fs/cgroup/" + ctrl + "/cube-vmm/" + cgName)
		if len(matches)+len(m2) > 0 {
			t.Errorf("cgroup left behind: %v %v", matches, m2)
		}
	}
}

// TestProcessVirtioDevices starts a VMM with a disk, vsock and rng: the
// synthetic guest reads each virtio-mmio window's magic and device id
// and prints them, proving the devices are mapped where the command line
// says, in a real process under the seccomp filter.
func TestProcessVirtioDevices(t *testing.T) {
	a := synth.New(synth.LoadAddr)
	for i := uint32(0); i < 3; i++ {
		base := 0xd0000000 + i*0x1000
		a.OutMMIO32(0x3f8, base).OutMMIO32(0x3f8, base+8)
	}
	bin, dir, kernel := vmmTest(t, false, a.OutStr(0x3f8, "\ndone\n").Spin().Bytes())
	disk := filepath.Join(dir, "base.img")
	os.WriteFile(disk, make([]byte, 1<<20), 0o644)
	serial := filepath.Join(dir, "serial.log")
	p := launch(t, LaunchConfig{
		Binary: bin, Socket: filepath.Join(dir, "api.sock"), Stderr: os.Stderr,
		Options: Options{Kernel: kernel, KernelFormat: "raw", MemMiB: 32, VCPUs: 1, SerialLog: serial,
			Disks: []Disk{{Base: disk, Overlay: filepath.Join(dir, "overlay.cow")}}, VsockUDS: filepath.Join(dir, "vsock.sock"), VsockCID: 3, RNG: true},
	})
	waitFile(t, serial, "done\n")
	b, _ := os.ReadFile(serial)
	want := "virt\x02\x00\x00\x00virt\x13\x00\x00\x00virt\x04\x00\x00\x00\ndone\n"
	if string(b) != want {
		t.Fatalf("guest saw %q, want %q", b, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := p.Client.Status(ctx)
	if err != nil || !strings.Contains(st.Cmdline, "virtio_mmio.device=4K@0xd0002000:7") {
		t.Fatalf("status %+v %v", st, err)
	}
	if !fileExists(filepath.Join(dir, "vsock.sock")) {
		t.Fatal("vsock listener missing")
	}
	if err := p.Stop(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestProcessSelfCgroup runs `cube vmm --cgroup` directly (no launcher):
// the VMM creates and joins its cgroup, and under its seccomp filter
// moves itself out and removes it on exit.
func TestProcessSelfCgroup(t *testing.T) {
	bin, dir, kernel := vmmTest(t, true, synth.Hello("self cgroup\n"))
	sock := filepath.Join(dir, "api.sock")
	name := "self-" + strconv.Itoa(os.Getpid())
	o := Options{Kernel: kernel, KernelFormat: "raw", MemMiB: 32, VCPUs: 1, APISocket: sock, Cgroup: name}
	cmd := exec.Command(bin, append([]string{"vmm"}, o.Args()...)...)
	cmd.Env = append(os.Environ(), "GODEBUG=updatemaxprocs=0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	c := NewClient(sock)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	cg, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	if strings.Count(string(cg), "/cube-vmm/"+name) < 3 {
		t.Fatalf("not in its cgroup:\n%s", cg)
	}
	if _, err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	for _, ctrl := range []string{"cpu", "memory", "pids"} {
		filepath.WalkDir("/sys/fs/cgroup/"+ctrl, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() && d.Name() == name {
				t.Errorf("cgroup %s left behind", p)
			}
			if d != nil && d.IsDir() && strings.Count(p, "/") > 7 {
				return filepath.SkipDir
			}
			return nil
		})
	}
}

// TestProcessJailFlag runs `cube vmm --jail` (the CLI path through
// Launch): the VMM it re-executes is in other namespaces and a cgroup,
// and the outer process relays the VMM's exit.
func TestProcessJailFlag(t *testing.T) {
	bin, dir, kernel := vmmTest(t, true, synth.TripleFault("jailed crash\n"))
	sock := filepath.Join(dir, "api.sock")
	o := Options{Kernel: kernel, KernelFormat: "raw", MemMiB: 32, VCPUs: 1, APISocket: sock, NoStart: true,
		Cgroup: "jailflag-" + strconv.Itoa(os.Getpid())}
	cmd := exec.Command(bin, append(append([]string{"vmm"}, o.Args()...), "--jail")...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	c := NewClient(sock)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := c.WaitReady(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.PID == cmd.Process.Pid {
		t.Fatal("--jail did not re-execute the VMM")
	}
	mine, _ := os.Readlink("/proc/self/ns/net")
	its, _ := os.Readlink("/proc/" + strconv.Itoa(st.PID) + "/ns/net")
	if its == "" || its == mine {
		t.Fatalf("jailed VMM net namespace %q, ours %q", its, mine)
	}
	if _, err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != ExitCrashed {
		t.Fatalf("outer process exit %v, want the VMM's crash code %d", err, ExitCrashed)
	}
	if fileExists(sock) {
		t.Fatal("socket left behind")
	}
}
