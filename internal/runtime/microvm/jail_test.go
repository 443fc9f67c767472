//go:build linux

package microvm

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	stt "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// realCube returns $CUBE_BIN/cube or builds cmd/cube into a temp dir.
func realCube(t *testing.T) string {
	t.Helper()
	if d := os.Getenv("CUBE_BIN"); d != "" {
		if p := filepath.Join(d, "cube"); fileExists(p) {
			return p
		}
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no cube binary: set CUBE_BIN (no go toolchain to build one)")
	}
	out := filepath.Join(t.TempDir(), "cube")
	if b, err := exec.Command("go", "build", "-o", out, "github.com/cubesandbox/cube/cmd/cube").CombinedOutput(); err != nil {
		t.Fatalf("build cube: %v\n%s", err, b)
	}
	return out
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestPoolJailedVMM runs the runtime's default VMM (the real `cube
// vmm-restore --jail`): the pool's pre-started VMM is in its own
// namespaces and cgroup; restored through the runtime's per-request
// device path it sets the cgroup limits from the VM, runs under its
// seccomp filter, writes a diff snapshot (as Pause does) and, stopped,
// leaves no cgroup behind.
func TestPoolJailedVMM(t *testing.T) {
	needRoot(t)
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	if err := jail.CgroupsAvailable(); err != nil {
		t.Skipf("no usable cgroups: %v", err)
	}
	bin := realCube(t)
	dir := t.TempDir()
	rt, err := New(Options{Dir: dir, CubeBin: bin, PoolSize: 1, Kernel: kernelPath()})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	if !stt.WaitFor(30*time.Second, func() bool {
		rt.pool.mu.Lock()
		defer rt.pool.mu.Unlock()
		return len(rt.pool.ready) == 1
	}) {
		t.Fatal("pool did not pre-start a VMM")
	}
	rt.pool.mu.Lock()
	launcher := rt.pool.ready[0].v.cmd.Process.Pid
	rt.pool.mu.Unlock()
	sbDir := rt.sbDir("jailed")
	os.MkdirAll(sbDir, 0o755)
	v, err := rt.pool.get(sbDir)
	if err != nil {
		t.Fatal(err)
	}
	if v.pid == launcher {
		t.Fatalf("runtime records the jail launcher (%d), not the VMM", launcher)
	}
	proc := "/proc/" + strconv.Itoa(v.pid)
	for _, ns := range []string{"mnt", "net", "ipc", "uts"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		its, err := os.Readlink(proc + "/ns/" + ns)
		if err != nil || its == mine {
			t.Errorf("namespace %s: vmm %q, runtime %q (%v)", ns, its, mine, err)
		}
	}
	cgName := "/cube-vmm/vmm-restore-" + strconv.Itoa(launcher)
	var memDir string
	stt.WaitFor(5*time.Second, func() bool {
		b, _ := os.ReadFile(proc + "/cgroup")
		for _, line := range strings.Split(string(b), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) == 3 && strings.HasSuffix(parts[2], cgName) && (parts[1] == "memory" || parts[1] == "") {
				memDir = filepath.Join("/sys/fs/cgroup", parts[1], parts[2])
			}
		}
		return memDir != ""
	})
	if memDir == "" {
		b, _ := os.ReadFile(proc + "/cgroup")
		t.Fatalf("VMM not in a memory cgroup ending %s:\n%s", cgName, b)
	}

	snap := syntheticSnapshot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rep, err := v.cl.Restore(ctx, vmmapi.RestoreRequest{Dir: snap, WaitWord: stt.Counter,
		Options: &vmmapi.Options{MemMiB: stt.MemSize >> 20, VCPUs: 1, RNG: true}})
	if err != nil || rep.Status.State != "running" {
		b, _ := os.ReadFile(filepath.Join(sbDir, "vmm.log"))
		t.Fatalf("restore in a jailed runtime VMM: %+v %v\n%s", rep, err, b)
	}
	status, _ := os.ReadFile(proc + "/status")
	for _, want := range []string{"NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("status lacks %q", want)
		}
	}
	limFile := "memory.limit_in_bytes"
	if fileExists(filepath.Join(memDir, "memory.max")) {
		limFile = "memory.max"
	}
	if b, _ := os.ReadFile(filepath.Join(memDir, limFile)); strings.TrimSpace(string(b)) != strconv.Itoa((stt.MemSize>>20+256)<<20) {
		t.Errorf("%s = %q, want guest RAM + 256 MiB", limFile, b)
	}
	pause := filepath.Join(sbDir, "pause-1")
	if _, err := v.cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: pause, Diff: true}); err != nil {
		t.Fatalf("diff snapshot under the filter: %v", err)
	}
	if _, err := snapshot.Load(pause); err != nil {
		t.Fatal(err)
	}
	stopVMM(v.pid, v.socket)
	if alive(v.pid) {
		t.Fatal("VMM alive after stop")
	}
	if !stt.WaitFor(10*time.Second, func() bool { return !alive(launcher) && !fileExists(memDir) }) {
		t.Fatalf("launcher alive %v, cgroup %s left %v", alive(launcher), memDir, fileExists(memDir))
	}
}
