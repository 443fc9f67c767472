//go:build linux

package microvm

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	stt "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// realCube returns $CUBE_BIN/cube or builds cmd/cube (and cmd/cube-vmm
// beside it) into a temp dir.
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
	d := t.TempDir()
	out := filepath.Join(d, "cube")
	// cube-vmm beside it: the VMM a jailed launcher executes.
	if b, err := exec.Command("go", "build", "-o", d+"/", "github.com/cubesandbox/cube/cmd/cube", "github.com/cubesandbox/cube/cmd/cube-vmm").CombinedOutput(); err != nil {
		t.Fatalf("build cube: %v\n%s", err, b)
	}
	return out
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func needJail(t *testing.T) {
	t.Helper()
	needRoot(t)
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	if err := jail.CgroupsAvailable(); err != nil {
		t.Skipf("no usable cgroups: %v", err)
	}
}

// gone: no /proc entry at all (exited and reaped, not a zombie).
func gone(pid int) bool { return !fileExists("/proc/" + strconv.Itoa(pid)) }

// memCgroup is the VMM's memory cgroup directory named .../cube-vmm/name.
func memCgroup(t *testing.T, pid int, name string) string {
	t.Helper()
	proc := "/proc/" + strconv.Itoa(pid)
	var memDir string
	b, _ := os.ReadFile(proc + "/cgroup")
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) == 3 && strings.HasSuffix(parts[2], "/cube-vmm/"+name) && (parts[1] == "memory" || parts[1] == "") {
			memDir = filepath.Join("/sys/fs/cgroup", parts[1], parts[2])
		}
	}
	if memDir == "" || !fileExists(memDir) {
		t.Fatalf("VMM %d not in a memory cgroup ending /cube-vmm/%s:\n%s", pid, name, b)
	}
	return memDir
}

// restoreSynth restores the synthetic guest through the runtime's
// per-request device path and pauses it (idle).
func restoreSynth(t *testing.T, v *vmm, snap, logDir string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rep, err := v.cl.Restore(ctx, vmmapi.RestoreRequest{Dir: snap, WaitWord: stt.Counter,
		Options: &vmmapi.Options{MemMiB: stt.MemSize >> 20, VCPUs: 1, RNG: true}})
	if err != nil || rep.Status.State != "running" {
		b, _ := os.ReadFile(filepath.Join(logDir, "vmm.log"))
		t.Fatalf("restore in a jailed runtime VMM: %+v %v\n%s", rep, err, b)
	}
}

// TestPoolJailedVMM runs the runtime's default VMM (the real `cube
// vmm-restore --jail`): the jail launcher has exited (and was reaped)
// once the pool holds the VMM, which is in its own namespaces and
// cgroup, created as the runtime's child (CLONE_PARENT: this process is
// no subreaper here); restored through
// the runtime's per-request device path it sets the cgroup limits from
// the VM, runs under its seccomp filter, writes a diff snapshot (as Pause
// does); stopped, it is reaped and its cgroup removed; a second pooled
// VMM killed with SIGKILL is reaped and its cgroup removed too.
func TestPoolJailedVMM(t *testing.T) {
	needJail(t)
	// Prove the parentage without a subreaper (another test sets it).
	var was int
	unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&was)), 0, 0, 0)
	unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, uintptr(was), 0, 0, 0)
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
	sbDir := rt.sbDir("jailed")
	os.MkdirAll(sbDir, 0o755)
	v, err := rt.pool.get(sbDir)
	if err != nil {
		t.Fatal(err)
	}
	if v.pid == v.launcher || v.launcher <= 0 {
		t.Fatalf("runtime records the jail launcher (%d), not the VMM (%d)", v.launcher, v.pid)
	}
	if !gone(v.launcher) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(v.launcher) + "/stat")
		t.Fatalf("jail launcher %d still there once its VMM serves: %s", v.launcher, b)
	}
	proc := "/proc/" + strconv.Itoa(v.pid)
	if vb := filepath.Join(filepath.Dir(bin), "cube-vmm"); fileExists(vb) {
		if exe, _ := os.Readlink(proc + "/exe"); exe != vb {
			t.Errorf("VMM runs %q, want the VMM-only %s", exe, vb)
		}
	}
	if b, _ := os.ReadFile(proc + "/stat"); !strings.Contains(string(b), ") S "+strconv.Itoa(os.Getpid())+" ") &&
		!strings.Contains(string(b), ") R "+strconv.Itoa(os.Getpid())+" ") {
		t.Errorf("VMM is not the runtime's (%d) child: %s", os.Getpid(), b)
	}
	for _, ns := range []string{"mnt", "net", "ipc", "uts"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		its, err := os.Readlink(proc + "/ns/" + ns)
		if err != nil || its == mine {
			t.Errorf("namespace %s: vmm %q, runtime %q (%v)", ns, its, mine, err)
		}
	}
	if !strings.HasPrefix(v.cgroup, rt.cgPrefix) {
		t.Fatalf("cgroup %q lacks the runtime's prefix %q", v.cgroup, rt.cgPrefix)
	}
	memDir := memCgroup(t, v.pid, v.cgroup)

	snap := syntheticSnapshot(t)
	restoreSynth(t, v, snap, sbDir)
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
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pause := filepath.Join(sbDir, "pause-1")
	if _, err := v.cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: pause, Diff: true}); err != nil {
		t.Fatalf("diff snapshot under the filter: %v", err)
	}
	if _, err := snapshot.Load(pause); err != nil {
		t.Fatal(err)
	}
	rt.stopVMM(v.pid, v.socket)
	if !gone(v.pid) {
		t.Fatal("VMM not reaped after stop")
	}
	if e := v.sup.Exit(); !e.Reaped || e.Code != 0 || e.Signal != 0 {
		t.Errorf("stopped VMM: %s, want reaped here with exit code 0", e)
	}
	if fileExists(memDir) {
		t.Fatalf("cgroup %s left after stop", memDir)
	}

	// kill -9 of the next pooled VMM: reaped, cgroup removed.
	if !stt.WaitFor(30*time.Second, func() bool {
		rt.pool.mu.Lock()
		defer rt.pool.mu.Unlock()
		return len(rt.pool.ready) == 1
	}) {
		t.Fatal("pool did not refill")
	}
	rt.pool.mu.Lock()
	v2 := rt.pool.ready[0].v
	rt.pool.mu.Unlock()
	if !gone(v2.launcher) {
		t.Errorf("second launcher %d still there", v2.launcher)
	}
	memDir2 := memCgroup(t, v2.pid, v2.cgroup)
	syscall.Kill(v2.pid, syscall.SIGKILL)
	if !v2.sup.WaitFor(10 * time.Second) {
		t.Fatal("killed VMM not seen exiting")
	}
	if e := v2.sup.Exit(); !e.Reaped || e.Signal != syscall.SIGKILL {
		t.Errorf("killed VMM: %s, want reaped here, SIGKILL", e)
	}
	if !gone(v2.pid) || fileExists(memDir2) {
		t.Fatalf("after kill -9: VMM gone %v, cgroup %s left %v", gone(v2.pid), memDir2, fileExists(memDir2))
	}

	// A VMM that fails before it serves: a clear error, and the dead VMM
	// (our child) reaped, its cgroup and the launcher gone.
	rt.pool.close()
	_, err = rt.startVMM(filepath.Join(dir, "bad"), "--guest", "bogus")
	if err == nil || !strings.Contains(err.Error(), "exited before it served") {
		t.Fatalf("start of a failing jailed VMM: %v", err)
	}
	var pid int
	if i := strings.Index(err.Error(), "vmm pid "); i >= 0 {
		fmt.Sscan(err.Error()[i+len("vmm pid "):], &pid)
	}
	if pid <= 0 || !gone(pid) {
		t.Errorf("failed VMM %d not reaped (%v)", pid, err)
	}
	if left := jail.RemoveStale(rt.cgPrefix); len(left) > 0 {
		t.Errorf("cgroups left: %v", left)
	}
}

// TestJailedCrashAdopt: a runtime process holding jailed VMMs (two
// sandboxes, one pooled) dies with SIGKILL; one orphaned VMM is then
// killed while no runtime runs. A new runtime on the same dir adopts the
// live sandbox, removes the dead one and its cgroup, stops the previous
// pool's VMM and removes its cgroup; when the adopted VMM is later
// killed -9 its cgroup is removed; Destroy of a second adopted one leaves
// no VMM and no cgroup.
func TestJailedCrashAdopt(t *testing.T) {
	if d := os.Getenv("CUBE_MICROVM_CRASH_HELPER"); d != "" {
		crashHelper(t, d)
		return
	}
	needJail(t)
	bin := realCube(t)
	dir := t.TempDir()
	snap := syntheticSnapshot(t)
	// Orphans of the helper come to this process (as they would to the
	// node's service manager), which reaps them once adopted.
	if err := vmmapi.SetSubreaper(); err != nil {
		t.Fatal(err)
	}
	h := exec.Command(os.Args[0], "-test.run=^TestJailedCrashAdopt$", "-test.v")
	h.Env = append(os.Environ(), "CUBE_MICROVM_CRASH_HELPER="+dir, "CUBE_TEST_CUBE="+bin, "CUBE_TEST_SNAP="+snap)
	out, _ := h.StdoutPipe()
	h.Stderr = os.Stderr
	if err := h.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		b := make([]byte, 4096)
		var acc string
		for {
			n, err := out.Read(b)
			acc += string(b[:n])
			if strings.Contains(acc, "CRASH-HELPER-READY") {
				ready <- true
				io.Copy(io.Discard, out)
				return
			}
			if err != nil {
				ready <- false
				t.Logf("helper output:\n%s", acc)
				return
			}
		}
	}()
	if !<-ready {
		h.Process.Kill()
		h.Wait()
		t.Fatal("crash helper failed")
	}
	recs := map[string]record{}
	for _, id := range []string{"a", "b", "c"} {
		var r record
		if err := readJSON(filepath.Join(dir, "sandboxes", id, "sandbox.json"), &r); err != nil {
			t.Fatal(err)
		}
		recs[id] = r
	}
	poolEnts, _ := filepath.Glob(filepath.Join(dir, "pool", "*", "pid"))
	if len(poolEnts) != 1 {
		t.Fatalf("helper pool: %v", poolEnts)
	}
	pb, _ := os.ReadFile(poolEnts[0])
	poolPID, _ := strconv.Atoi(strings.TrimSpace(string(pb)))
	cgDirs := map[string]string{}
	for id, r := range recs {
		cgDirs[id] = memCgroup(t, r.PID, r.Cgroup)
	}
	poolCg := ""
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(poolPID) + "/cgroup"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) == 3 && strings.Contains(parts[2], "/cube-vmm/") && (parts[1] == "memory" || parts[1] == "") {
				poolCg = filepath.Join("/sys/fs/cgroup", parts[1], parts[2])
			}
		}
	}
	if poolCg == "" {
		t.Fatalf("pooled VMM %d has no cgroup", poolPID)
	}
	// The runtime dies; then sandbox b's VMM dies unsupervised.
	h.Process.Kill()
	h.Wait()
	syscall.Kill(recs["b"].PID, syscall.SIGKILL)
	// (This process stands in for the service manager that reaps it.)
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(recs["b"].PID, &ws, 0, nil); err != nil {
		t.Fatalf("reap b: %v", err)
	}
	if !fileExists(cgDirs["b"]) {
		t.Fatal("test premise: b's cgroup should outlive it while no runtime runs")
	}

	rt, err := New(Options{Dir: dir, CubeBin: bin, PoolSize: 0, Kernel: kernelPath()})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	list, _ := rt.List(context.Background())
	ids := map[string]bool{}
	for _, i := range list {
		ids[i.ID] = true
	}
	if !ids["a"] || !ids["c"] || ids["b"] || len(ids) != 2 {
		t.Fatalf("adopted %v, want a and c", ids)
	}
	if fileExists(cgDirs["b"]) || fileExists(rt.sbDir("b")) {
		t.Errorf("dead sandbox b: cgroup left %v, dir left %v", fileExists(cgDirs["b"]), fileExists(rt.sbDir("b")))
	}
	if !stt.WaitFor(5*time.Second, func() bool { return !alive(poolPID) && !fileExists(poolCg) }) {
		t.Errorf("previous pool VMM %d alive %v, cgroup %s left %v", poolPID, alive(poolPID), poolCg, fileExists(poolCg))
	}
	// The adopted a, killed -9: seen, reaped (it is this process's child
	// now), cgroup removed.
	syscall.Kill(recs["a"].PID, syscall.SIGKILL)
	if !stt.WaitFor(10*time.Second, func() bool { return gone(recs["a"].PID) && !fileExists(cgDirs["a"]) }) {
		t.Fatalf("adopted VMM killed -9: gone %v, cgroup %s left %v", gone(recs["a"].PID), cgDirs["a"], fileExists(cgDirs["a"]))
	}
	if err := rt.Destroy(context.Background(), "c"); err != nil {
		t.Fatal(err)
	}
	if !stt.WaitFor(5*time.Second, func() bool { return gone(recs["c"].PID) && !fileExists(cgDirs["c"]) }) {
		t.Fatalf("destroyed c: VMM gone %v, cgroup left %v", gone(recs["c"].PID), fileExists(cgDirs["c"]))
	}
	rt.Destroy(context.Background(), "a")
	if left := jail.RemoveStale(rt.cgPrefix); len(left) > 0 {
		t.Errorf("cgroups left behind: %v", left)
	}
}

// crashHelper is the runtime process TestJailedCrashAdopt kills: three
// running sandboxes (restored, paused synthetic guests) and one pooled
// VMM, then it waits to be killed.
func crashHelper(t *testing.T, dir string) {
	rt, err := New(Options{Dir: dir, CubeBin: os.Getenv("CUBE_TEST_CUBE"), PoolSize: 1, Kernel: kernelPath()})
	if err != nil {
		t.Fatal(err)
	}
	snap := os.Getenv("CUBE_TEST_SNAP")
	for _, id := range []string{"a", "b", "c"} {
		sbDir := rt.sbDir(id)
		os.MkdirAll(sbDir, 0o755)
		v, err := rt.pool.get(sbDir)
		if err != nil {
			t.Fatal(err)
		}
		restoreSynth(t, v, snap, sbDir)
		if _, err := v.cl.Pause(context.Background()); err != nil {
			t.Fatal(err)
		}
		rec := record{ID: id, TemplateID: "tpl", State: runtime.StateRunning, PID: v.pid, Socket: v.socket, Cgroup: v.cgroup, StartedAt: time.Now()}
		if err := writeJSON(filepath.Join(sbDir, "sandbox.json"), rec); err != nil {
			t.Fatal(err)
		}
	}
	if !stt.WaitFor(30*time.Second, func() bool {
		rt.pool.mu.Lock()
		defer rt.pool.mu.Unlock()
		return len(rt.pool.ready) == 1
	}) {
		t.Fatal("pool did not refill")
	}
	fmt.Println("CRASH-HELPER-READY")
	select {}
}
