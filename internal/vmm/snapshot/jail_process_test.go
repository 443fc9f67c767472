//go:build linux

package snapshot_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

var (
	cubeOnce  sync.Once
	cubePath  string
	cubeError error
)

// cubeBinary returns the cube executable: $CUBE_BIN/cube (make test), or
// one built once (with cube-vmm beside it) into a world-readable temp dir (the jailed VMM runs it
// as nobody); TestMain removes it.
func cubeBinary(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("CUBE_BIN"); d != "" {
		if p := filepath.Join(d, "cube"); fileOK(p) {
			return p
		}
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no cube binary: set CUBE_BIN to the directory holding cube (no go toolchain to build one)")
	}
	cubeOnce.Do(func() {
		d, err := os.MkdirTemp("", "cube-bin-")
		if err != nil {
			cubeError = err
			return
		}
		os.Chmod(d, 0o755)
		out := filepath.Join(d, "cube")
		// cube-vmm beside it: the VMM a jailed launcher executes.
		if b, err := exec.Command("go", "build", "-o", d+"/", "github.com/cubesandbox/cube/cmd/cube", "github.com/cubesandbox/cube/cmd/cube-vmm").CombinedOutput(); err != nil {
			cubeError = errors.New(err.Error() + "\n" + string(b))
			os.RemoveAll(d)
			return
		}
		cubePath = out
		builtDirs = append(builtDirs, d)
	})
	if cubeError != nil {
		t.Fatalf("build cube: %v", cubeError)
	}
	return cubePath
}

var builtDirs []string

func fileOK(p string) bool { _, err := os.Stat(p); return err == nil }

// syncBuf is a goroutine-safe buffer for a child's stderr.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	os.Stderr.Write(p)
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type jailedVMM struct {
	launcher int // the jail launcher (`cube vmm-restore --jail`): exited once the VMM serves
	cl       *vmmapi.Client
	pid      int // the VMM itself, this process's child (CLONE_PARENT)
	sup      *vmmapi.Supervised
	stderr   *syncBuf
	cg       string
}

// startJailed starts `cube vmm-restore --jail` for the synthetic guest
// with a seccomp probe, checks that the launcher exits 0 once the VMM
// answers (printing the VMM's pid), that the VMM is this process's child
// (CLONE_PARENT, as the microVM runtime gets it) and supervises it.
func startJailed(t *testing.T, dir string, probe string, extra ...string) *jailedVMM {
	t.Helper()
	needKVM(t)
	if os.Geteuid() != 0 {
		t.Skip("needs root (namespaces, cgroups, uid drop)")
	}
	if err := jail.CgroupsAvailable(); err != nil {
		t.Skipf("no usable cgroups: %v", err)
	}
	bin := cubeBinary(t)
	sock := filepath.Join(dir, "vmm.sock")
	cg := "test-restore-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano()%1e6, 10)
	args := append([]string{"vmm-restore", "--jail", "--api-socket", sock, "--cgroup", cg}, extra...)
	cmd := exec.Command(bin, args...)
	v := &jailedVMM{cl: vmmapi.NewClient(sock), stderr: &syncBuf{}, cg: cg}
	// stderr through a pipe this process reads: the VMM inherits it and
	// outlives the launcher (an io.Writer would make Wait wait for it).
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, pw
	cmd.Env = append(os.Environ(), "CUBE_VMM_SECCOMP_PROBE="+probe)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	go io.Copy(v.stderr, pr)
	v.launcher = cmd.Process.Pid
	werr := make(chan error, 1)
	go func() { werr <- cmd.Wait() }()
	select {
	case err = <-werr:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		err = <-werr
		t.Fatalf("launcher did not exit once its VMM served: %v\n%s", err, v.stderr.String())
	}
	if err != nil {
		t.Fatalf("launcher: %v\n%s", err, v.stderr.String())
	}
	var out struct {
		PID    int    `json:"pid"`
		Cgroup string `json:"cgroup"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil || out.PID <= 0 || out.Cgroup != cg {
		t.Fatalf("launcher output %q: %v", stdout.String(), err)
	}
	v.pid = out.PID
	c, err := jail.OpenCgroup(cg)
	if err != nil {
		t.Fatal(err)
	}
	if v.sup, err = vmmapi.Supervise(v.pid, c, sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !v.sup.Kill(10 * time.Second) {
			t.Errorf("VMM %d not reaped after SIGKILL", v.pid)
		}
		pr.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := v.cl.WaitReady(ctx)
	if err != nil {
		t.Fatalf("%v\n%s", err, v.stderr.String())
	}
	if st.PID != v.pid || v.pid == v.launcher {
		t.Fatalf("status pid %d, launcher said %d: want the re-executed VMM, not the launcher %d", st.PID, v.pid, v.launcher)
	}
	// The VMM-only binary beside cube is what runs as the VMM.
	if vb := filepath.Join(filepath.Dir(bin), "cube-vmm"); fileOK(vb) {
		if exe, _ := os.Readlink("/proc/" + strconv.Itoa(v.pid) + "/exe"); exe != vb {
			t.Errorf("VMM runs %q, want %s", exe, vb)
		}
	}
	// The launcher is gone (reaped above), the VMM is this process's child
	// (no subreaper involved).
	if fileOK("/proc/" + strconv.Itoa(v.launcher)) {
		t.Errorf("launcher %d still exists", v.launcher)
	}
	if b, _ := os.ReadFile("/proc/" + strconv.Itoa(v.pid) + "/stat"); !strings.Contains(string(b), " "+strconv.Itoa(os.Getpid())+" ") {
		t.Errorf("VMM is not this process's (%d) child: %s", os.Getpid(), b)
	}
	return v
}

// cgroupDirs are the VMM cgroup's directories (v1: one per controller).
func cgroupDirs(t *testing.T, pid int, name string) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || !strings.HasSuffix(parts[2], "/cube-vmm/"+name) {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "" {
				out["v2"] = filepath.Join("/sys/fs/cgroup", parts[2])
			} else {
				out[c] = filepath.Join("/sys/fs/cgroup", c, parts[2])
			}
		}
	}
	return out
}

func readTrim(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

// TestJailedRestoreVMM runs the production configuration of the
// pre-started VMM (`cube vmm-restore --jail`, as the microVM runtime
// starts it) as uid/gid 65534: it is in its own namespaces and cgroup
// and holds only the fds it needs; it restores a synthetic snapshot,
// sets the cgroup limits from the restored VM's size, installs the
// seccomp filter (a probe open of /etc/hostname is refused with EPERM),
// takes a full and two diff snapshots (pagemap, layer files, hard
// links, renames) that restore correctly, pauses, resumes and stops;
// then it is reaped here (exit 0) and the cgroup and socket are gone.
// The launcher exited (0, printing the VMM's pid) before any of this.
func TestJailedRestoreVMM(t *testing.T) {
	work, err := os.MkdirTemp("", "cube-jailed-restore-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	os.Chmod(work, 0o777)
	base := filepath.Join(work, "base")
	orig, _ := takeSnapshot(t, base)
	orig.VM.Close()
	// The VMM's uid owns the snapshots it links (fs.protected_hardlinks).
	filepath.Walk(base, func(p string, _ os.FileInfo, _ error) error { return os.Lchown(p, 65534, 65534) })
	v := startJailed(t, work, "open", "--uid", "65534", "--gid", "65534")
	proc := "/proc/" + strconv.Itoa(v.pid)

	// Namespaces and cgroup (before the restore already).
	for _, ns := range []string{"mnt", "net", "ipc", "uts"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		its, err := os.Readlink(proc + "/ns/" + ns)
		if err != nil || its == mine {
			t.Errorf("namespace %s: vmm %q, test %q (%v)", ns, its, mine, err)
		}
	}
	// The VMM serves only once it is in its cgroup (the launcher's start
	// pipe).
	dirs := cgroupDirs(t, v.pid, v.cg)
	if _, v2 := dirs["v2"]; !v2 {
		for _, c := range []string{"cpu", "memory", "pids"} {
			if dirs[c] == "" {
				b, _ := os.ReadFile(proc + "/cgroup")
				t.Errorf("vmm not in cgroup cube-vmm/%s for %s: %v\n%s", v.cg, c, dirs, b)
			}
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rep, err := v.cl.Restore(ctx, vmmapi.RestoreRequest{Dir: base, WaitWord: st.Counter})
	if err != nil || rep.Status.State != "running" {
		t.Fatalf("restore: %+v %v\n%s", rep, err, v.stderr.String())
	}
	status, _ := os.ReadFile(proc + "/status")
	for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "Gid:\t65534\t65534\t65534\t65534", "NoNewPrivs:\t1", "Seccomp:\t2"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("status lacks %q:\n%s", want, status)
		}
	}
	// (stderr reaches the test through a pipe: give it a moment.)
	if !st.WaitFor(5*time.Second, func() bool {
		return strings.Contains(v.stderr.String(), "seccomp probe: open /etc/hostname: open /etc/hostname: operation not permitted")
	}) {
		t.Errorf("the probe open was not refused with EPERM:\n%s", v.stderr.String())
	}
	// Limits from the VM's size: 64 MiB + 256 MiB, 128 + 2 threads, 1 CPU.
	wantMem := strconv.Itoa((st.MemSize>>20 + 256) << 20)
	if d, ok := dirs["v2"]; ok {
		if got := readTrim(filepath.Join(d, "memory.max")); got != wantMem {
			t.Errorf("memory.max %s, want %s", got, wantMem)
		}
	} else {
		for file, want := range map[string]string{
			filepath.Join(dirs["memory"], "memory.limit_in_bytes"): wantMem,
			filepath.Join(dirs["pids"], "pids.max"):                "130",
			filepath.Join(dirs["cpu"], "cpu.cfs_quota_us"):         "100000",
		} {
			if got := readTrim(file); got != want {
				t.Errorf("%s = %s, want %s", file, got, want)
			}
		}
	}
	// Only the fds it needs: stdio, /dev/kvm (and the VM's anon inodes),
	// the control socket and its connections, pagemap, eventfds, epoll.
	fds, err := os.ReadDir(proc + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	allowed := []string{"/dev/null", "pipe:", "/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu", "anon_inode:[eventfd]",
		"anon_inode:[eventpoll]", "anon_inode:[pidfd]", "socket:", "/sys/fs/cgroup/", "/proc/" + strconv.Itoa(v.pid) + "/pagemap", filepath.Join(base, "memory")}
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

	// Full snapshot (fork: keeps running), then two diff layers.
	full := filepath.Join(work, "full")
	if rep, err := v.cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: full, Resume: true}); err != nil || rep.Status.State != "running" {
		t.Fatalf("full snapshot: %+v %v", rep, err)
	}
	d1 := filepath.Join(work, "diff1")
	if rep, err := v.cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: d1, Diff: true, Resume: true}); err != nil || rep.WrittenMem == 0 {
		t.Fatalf("diff snapshot: %+v %v", rep, err)
	}
	d2 := filepath.Join(work, "diff2")
	if _, err := v.cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: d2, Diff: true, Resume: true}); err != nil {
		t.Fatalf("second diff snapshot into another dir: %v", err)
	}
	for _, dir := range []string{full, d1, d2} {
		m, s, err := snapshot.Restore(dir, st.Spec())
		if err != nil {
			t.Fatalf("restore %s: %v", dir, err)
		}
		if st.U64(m.VM, st.Phase) != 1 || st.U64(m.VM, st.Pattern+8*99) != st.PatternValue || st.U64(m.VM, st.Counter) == 0 {
			t.Errorf("%s: wrong state (phase %d, counter %d)", dir, st.U64(m.VM, st.Phase), st.U64(m.VM, st.Counter))
		}
		if dir != full && len(s.Meta.Layers) == 0 {
			t.Errorf("%s: a diff without layers", dir)
		}
		m.VM.Close()
	}
	// The diff links the base memory file (same inode).
	a, _ := os.Stat(filepath.Join(base, snapshot.MemoryFile))
	b, _ := os.Stat(filepath.Join(d1, snapshot.MemoryFile))
	if a == nil || b == nil || !os.SameFile(a, b) {
		t.Errorf("diff does not hard-link the base memory file")
	}

	if s, err := v.cl.Pause(ctx); err != nil || s.State != "paused" {
		t.Fatalf("pause: %+v %v", s, err)
	}
	if s, err := v.cl.Resume(ctx); err != nil || s.State != "running" {
		t.Fatalf("resume: %+v %v", s, err)
	}
	v.cl.Stop(ctx)
	if !v.sup.WaitFor(20 * time.Second) {
		t.Fatal("jailed VMM did not exit after stop")
	}
	if e := v.sup.Exit(); !e.Reaped || e.Code != 0 || e.Signal != 0 {
		t.Fatalf("VMM: %s, want reaped here with exit code 0\n%s", e, v.stderr.String())
	}
	if fileOK(proc) {
		t.Errorf("VMM %d not reaped", v.pid)
	}
	for c, d := range dirs {
		if fileOK(d) {
			t.Errorf("cgroup %s left behind: %s", c, d)
		}
	}
	if fileOK(filepath.Join(work, "vmm.sock")) {
		t.Error("control socket left behind")
	}
}

// TestJailedRestoreEarlyDeath: a jailed VMM that fails before it serves
// (an unknown --guest) makes the launcher fail (exit 1, its JSON line
// naming the VMM's pid and the error) after removing the cgroup and
// socket; the VMM is this process's child to reap.
func TestJailedRestoreEarlyDeath(t *testing.T) {
	needKVM(t)
	if os.Geteuid() != 0 || jail.CgroupsAvailable() != nil {
		t.Skip("needs root and cgroups")
	}
	bin := cubeBinary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "vmm.sock")
	cg := "test-early-" + strconv.Itoa(os.Getpid())
	cmd := exec.Command(bin, "vmm-restore", "--jail", "--api-socket", sock, "--cgroup", cg, "--guest", "bogus")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("launcher: %v, want exit 1\n%s", err, stderr.String())
	}
	// stdout: the pid (ours to reap) and the error.
	var rep struct {
		PID   int
		Error string
	}
	json.Unmarshal(stdout.Bytes(), &rep)
	pid := rep.PID
	if pid <= 0 || !strings.Contains(rep.Error, "exited before it served") || !strings.Contains(stderr.String(), `--guest "bogus"`) {
		t.Fatalf("launcher output %q:\n%s", stdout.String(), stderr.String())
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 1 {
		t.Errorf("reap the VMM %d (this process's child): %v, status %v", pid, err, ws)
	}
	c, _ := jail.OpenCgroup(cg)
	for _, d := range c.Dirs {
		if fileOK(d) {
			t.Errorf("cgroup %s left", d)
		}
	}
	if fileOK(sock) {
		t.Error("socket left")
	}
}

// TestJailedRestoreKilled: a jailed VMM (launcher gone) killed with
// SIGKILL is reaped by its supervisor, which removes its cgroup.
func TestJailedRestoreKilled(t *testing.T) {
	work := t.TempDir()
	base := filepath.Join(work, "base")
	orig, _ := takeSnapshot(t, base)
	orig.VM.Close()
	v := startJailed(t, work, "")
	dirs := cgroupDirs(t, v.pid, v.cg)
	if len(dirs) == 0 {
		t.Fatal("VMM not in its cgroup")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := v.cl.Restore(ctx, vmmapi.RestoreRequest{Dir: base, WaitWord: st.Counter}); err != nil {
		t.Fatal(err)
	}
	syscall.Kill(v.pid, syscall.SIGKILL)
	if !v.sup.WaitFor(20 * time.Second) {
		t.Fatal("killed VMM not seen exiting")
	}
	if e := v.sup.Exit(); !e.Reaped || e.Signal != syscall.SIGKILL {
		t.Fatalf("VMM: %s, want reaped here, SIGKILL", e)
	}
	if fileOK("/proc/" + strconv.Itoa(v.pid)) {
		t.Errorf("VMM %d not reaped", v.pid)
	}
	for c, d := range dirs {
		if fileOK(d) {
			t.Errorf("cgroup %s left behind: %s", c, d)
		}
	}
}

// TestJailedRestoreSeccompKills: a jailed vmm-restore that calls execve
// once its filter is installed is killed with SIGSYS; its supervisor
// (this process, its parent: the launcher is gone) reaps it, sees
// SIGSYS and removes the cgroup.
func TestJailedRestoreSeccompKills(t *testing.T) {
	work := t.TempDir()
	base := filepath.Join(work, "base")
	orig, _ := takeSnapshot(t, base)
	orig.VM.Close()
	v := startJailed(t, work, "execve")
	dirs := cgroupDirs(t, v.pid, v.cg)
	if len(dirs) == 0 {
		t.Fatal("VMM not in its cgroup")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := v.cl.Restore(ctx, vmmapi.RestoreRequest{Dir: base, WaitWord: st.Counter}); err == nil {
		t.Fatal("restore answered although the VMM made a forbidden syscall")
	}
	if !v.sup.WaitFor(20 * time.Second) {
		t.Fatal("VMM not killed")
	}
	if e := v.sup.Exit(); !e.Reaped || e.Signal != syscall.SIGSYS {
		t.Fatalf("VMM: %s, want killed by SIGSYS (reaped here)\n%s", e, v.stderr.String())
	}
	if strings.Contains(v.stderr.String(), "execve returned") {
		t.Error("execve returned instead of killing the VMM")
	}
	for c, d := range dirs {
		if fileOK(d) {
			t.Errorf("cgroup %s left behind: %s", c, d)
		}
	}
}

// BenchmarkPrestartedVMMProcess: one sandbox's VMM life as the runtime
// drives it: start `cube vmm-restore` (plain: no jail, no filter; jailed:
// --jail and the seccomp filter, the runtime's default, whose launcher
// exits once the VMM serves), wait until its socket answers, restore the
// synthetic snapshot until the guest runs, stop, wait for exit (jailed:
// reaped by this process, its parent, and the cgroup removed).
// Reported beside each other in one run: clone-PSS-KiB is the PSS of
// every process the clone keeps: the VMM (the jailed launcher has
// exited before the restore); alone here, it holds the cube binary's
// text by itself: clone-anon-KiB is its private part, what each further
// clone adds.
func BenchmarkPrestartedVMMProcess(b *testing.B) {
	needKVM(b)
	if os.Geteuid() != 0 || jail.CgroupsAvailable() != nil {
		b.Skip("needs root and cgroups")
	}
	bin := cubeBinary(b)
	dir := b.TempDir()
	base := filepath.Join(dir, "base")
	orig, _ := takeSnapshot(b, base)
	orig.VM.Close()
	for _, mode := range []string{"plain", "jailed"} {
		b.Run(mode, func(b *testing.B) {
			var pss, anon uint64
			for i := 0; i < b.N; i++ {
				sock := filepath.Join(dir, "b.sock")
				cg := fmt.Sprintf("bench-%d-%d", os.Getpid(), i)
				args := []string{"vmm-restore", "--api-socket", sock}
				if mode == "jailed" {
					args = append(args, "--jail", "--cgroup", cg)
				} else {
					args = append(args, "--no-seccomp")
				}
				exe := bin // jailed: the launcher, which executes cube-vmm if present
				if vb := filepath.Join(filepath.Dir(bin), "cube-vmm"); mode == "plain" && fileOK(vb) {
					exe = vb // the same VMM executable as jailed
				}
				cmd := exec.Command(exe, args...)
				var out bytes.Buffer
				cmd.Stdout = &out
				if err := cmd.Start(); err != nil {
					b.Fatal(err)
				}
				pid := cmd.Process.Pid
				var sup *vmmapi.Supervised
				if mode == "jailed" {
					if err := cmd.Wait(); err != nil {
						b.Fatalf("launcher: %v", err)
					}
					var o struct{ PID int }
					if err := json.Unmarshal(out.Bytes(), &o); err != nil {
						b.Fatalf("launcher output %q: %v", out.String(), err)
					}
					pid = o.PID
					c, _ := jail.OpenCgroup(cg)
					var err error
					if sup, err = vmmapi.Supervise(pid, c, sock); err != nil {
						b.Fatal(err)
					}
					cmd = nil
				}
				kill := func() {
					if sup != nil {
						sup.Kill(10 * time.Second)
					} else {
						cmd.Process.Kill()
						cmd.Wait()
					}
				}
				cl := vmmapi.NewClient(sock)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				if _, err := cl.WaitReady(ctx); err != nil {
					kill()
					cancel()
					b.Fatal(err)
				}
				if _, err := cl.Restore(ctx, vmmapi.RestoreRequest{Dir: base, WaitWord: st.Counter}); err != nil {
					kill()
					cancel()
					b.Fatal(err)
				}
				if m, err := st.ReadMem(pid); err == nil {
					pss += m.PSS
					anon += m.PSSAnon
				}
				cl.Stop(ctx)
				var err error
				if sup != nil {
					if !sup.WaitFor(20 * time.Second) {
						err = fmt.Errorf("vmm %d did not exit", pid)
					} else if e := sup.Exit(); !e.Reaped || e.Code != 0 {
						err = fmt.Errorf("vmm %d: %s", pid, e)
					}
				} else {
					err = cmd.Wait()
				}
				cancel()
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(pss)/float64(b.N)/1024, "clone-PSS-KiB")
			b.ReportMetric(float64(anon)/float64(b.N)/1024, "clone-anon-KiB")
		})
	}
}
