//go:build linux && vmtest

package vmtest

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// control is an HTTP client for a VMM's control socket.
func control(sock string) *http.Client {
	return &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

// post sends a JSON request to a VMM control socket and fails the test
// unless it succeeds.
func post(t *testing.T, sock, path string, body any) []byte {
	t.Helper()
	var in io.Reader = http.NoBody
	if body != nil {
		b, _ := json.Marshal(body)
		in = bytes.NewReader(b)
	}
	resp, err := control(sock).Post("http://vmm"+path, "application/json", in)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		t.Fatalf("POST %s: %s %s", path, resp.Status, out)
	}
	return out
}

// startRestoreVMM runs `cube vmm-restore --guest linux` (the pre-started
// VMM of the microVM runtime) and waits for its control socket.
func startRestoreVMM(t *testing.T, sock string, args ...string) *exec.Cmd {
	t.Helper()
	bin := filepath.Join(dir(t), "cube")
	cmd := exec.Command(bin, append([]string{"vmm-restore", "--log-level=debug", "--guest", "linux", "--api-socket", sock}, args...)...)
	logs := &console{}
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("%s log:\n%s", filepath.Base(sock), indent(logs.String()))
		}
	})
	for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return cmd
		}
		select {
		case <-exited:
			t.Fatalf("cube vmm-restore exited: %s", logs.String())
		default:
		}
		if time.Since(start) > time.Minute {
			t.Fatal("no control socket after a minute")
		}
	}
}

// waitAgent polls envd's /health over a vsock bridge.
func waitAgent(t *testing.T, hc *http.Client, limit time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		resp, err := hc.Get("http://agent/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				t.Logf("agent healthy after %.2fs", time.Since(start).Seconds())
				return
			}
		}
		if time.Since(start) > limit {
			t.Fatalf("agent not healthy over vsock after %v: %v", limit, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotRestoreLinux is the template bake and sandbox create of the
// microVM runtime with a real Linux guest on real KVM: a pre-started VMM
// boots the guest with cube-agent as PID 1, state is put into guest memory
// (a file on tmpfs), the VM is snapshotted (pause) and stopped; a second
// pre-started VMM restores the snapshot with its own disk overlay and vsock
// socket, and the agent answers there with the memory state intact.
func TestSnapshotRestoreLinux(t *testing.T) {
	d := dir(t)
	if out, err := exec.Command(filepath.Join(d, "cube"), "vmm-restore", "--help").CombinedOutput(); err != nil || !bytes.Contains(out, []byte("--guest")) {
		t.Skip("this build of cube has no `vmm-restore` (snapshots) yet")
	}
	tmp := t.TempDir()
	base := filepath.Join(d, "guest", "rootfs.ext4")
	opts := vmmapi.Options{
		Kernel: filepath.Join(d, "guest", "bzImage"), MemMiB: 256, VCPUs: 1,
		Disks:      []vmmapi.Disk{{Base: base, Overlay: filepath.Join(tmp, "bake.cow")}},
		VsockUDS:   filepath.Join(tmp, "bake.vsock"),
		SerialLog:  filepath.Join(tmp, "bake.serial"),
		Cmdline:    "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw init=/sbin/cube-agent cube.hostname=snap",
		ResultFile: filepath.Join(tmp, "bake.result"),
	}
	ob, _ := json.Marshal(opts)
	optsFile := filepath.Join(tmp, "bake.json")
	os.WriteFile(optsFile, ob, 0o600)
	bakeSock := filepath.Join(tmp, "bake.api")
	startRestoreVMM(t, bakeSock, "--options", optsFile, "--boot")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(opts.SerialLog)
			t.Logf("bake console:\n%s", indent(string(b)))
		}
	})

	hc := vsockClient(opts.VsockUDS, 49983)
	waitAgent(t, hc, 3*time.Minute)
	pc := processconnect.NewProcessClient(hc, "http://agent")
	if out, code := runInGuest(t, pc, "echo in-memory-state-$((6*7)) > /tmp/state && cat /tmp/state"); code != 0 || out != "in-memory-state-42\n" {
		t.Fatalf("writing state: exit %d %q", code, out)
	}
	hc.CloseIdleConnections()

	snap := filepath.Join(tmp, "snap")
	start := time.Now()
	rep := post(t, bakeSock, "/snapshot", map[string]any{"dir": snap})
	t.Logf("snapshot in %.2fs: %s", time.Since(start).Seconds(), bytes.TrimSpace(rep))
	// The sandbox's disk starts as the bake's disk at snapshot time.
	copyFile(t, opts.Disks[0].Overlay, filepath.Join(tmp, "sandbox.cow"))
	post(t, bakeSock, "/stop", nil)

	sbSock := filepath.Join(tmp, "sandbox.api")
	startRestoreVMM(t, sbSock)
	ro := opts
	ro.Disks = []vmmapi.Disk{{Base: base, Overlay: filepath.Join(tmp, "sandbox.cow")}}
	ro.VsockUDS = filepath.Join(tmp, "sandbox.vsock")
	ro.SerialLog = filepath.Join(tmp, "sandbox.serial")
	ro.ResultFile = filepath.Join(tmp, "sandbox.result")
	start = time.Now()
	rep = post(t, sbSock, "/restore", map[string]any{"dir": snap, "options": ro})
	t.Logf("restore in %.2fs: %s", time.Since(start).Seconds(), bytes.TrimSpace(rep))
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(ro.SerialLog)
			t.Logf("restored console:\n%s", indent(string(b)))
		}
	})

	hc2 := vsockClient(ro.VsockUDS, 49983)
	waitAgent(t, hc2, 2*time.Minute)
	pc2 := processconnect.NewProcessClient(hc2, "http://agent")
	out, code := runInGuest(t, pc2, "cat /tmp/state; cat /etc/cube-vmtest; hostname")
	if want := "in-memory-state-42\ncube-vmtest-rootfs-ok\nsnap\n"; code != 0 || out != want {
		t.Fatalf("after restore: exit %d, output %q, want %q", code, out, want)
	}
	post(t, sbSock, "/stop", nil)
}
