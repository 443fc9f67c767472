//go:build linux && vmtest

package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/vishvananda/netlink"

	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	pb "github.com/cubesandbox/cube/proto/process"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// vmmProc is one `cube vmm` process: its serial console (stdout, via
// --serial-log=-) and its own log (stderr).
type vmmProc struct {
	cmd    *exec.Cmd
	serial *console
	logs   *console
	done   chan struct{}
	err    error
	result string
}

// cubeBin is the image's static cube; tests that need `cube vmm` skip
// while the build has none.
func cubeBin(t *testing.T) string {
	t.Helper()
	p := filepath.Join(dir(t), "cube")
	out, err := exec.Command(p, "vmm", "--help").CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--kernel")) {
		t.Skip("this build of cube has no `vmm` subcommand yet")
	}
	return p
}

// startVMM runs `cube vmm` with o's flags (vmmapi.Options.Args, the same
// rendering the node uses). The process is killed at cleanup if still up,
// and its console and log are shown when the test failed.
func startVMM(t *testing.T, o vmmapi.Options) *vmmProc {
	t.Helper()
	bin := cubeBin(t)
	o.SerialLog = "-"
	o.ResultFile = filepath.Join(t.TempDir(), "result.json")
	p := &vmmProc{serial: &console{}, logs: &console{}, done: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"vmm"}, o.Args()...)...)
	p.cmd.Stdout, p.cmd.Stderr = p.serial, p.logs
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	t.Logf("cube vmm %s", strings.Join(o.Args(), " "))
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		if b, err := os.ReadFile(o.ResultFile); err == nil {
			p.result = string(b)
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("guest console:\n%s", indent(p.serial.String()))
			t.Logf("vmm log:\n%s", indent(p.logs.String()))
		}
	})
	return p
}

// wait waits for the VMM process to exit.
func (p *vmmProc) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		t.Fatalf("cube vmm still running after %v", timeout)
		return nil
	}
}

// outcome is the "outcome" of the VMM's result file.
func (p *vmmProc) outcome() string {
	var r struct {
		Outcome string `json:"outcome"`
	}
	json.Unmarshal([]byte(p.result), &r)
	return r.Outcome
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestVMMDiskBoot runs `cube vmm` (a process, as the node runs it) on the
// guest kernel with the busybox root disk on virtio-blk through a
// copy-on-write overlay, twice: the first boot reads the base, writes a
// file and reads virtio-rng; the second boot on the same overlay finds the
// file. The base image must not change.
func TestVMMDiskBoot(t *testing.T) {
	d := dir(t)
	base := filepath.Join(d, "guest", "rootfs.ext4")
	overlay := filepath.Join(t.TempDir(), "overlay.cow")
	before := fileSum(t, base)
	boot := func(script string) string {
		p := startVMM(t, vmmapi.Options{
			Kernel: filepath.Join(d, "guest", "bzImage"), MemMiB: 256, VCPUs: 1, RNG: true,
			Disks:   []vmmapi.Disk{{Base: base, Overlay: overlay}},
			Cmdline: `console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw init=/bin/sh -- -c "` + script + `; sync; reboot -f"`,
		})
		if err := p.wait(t, 3*time.Minute); err != nil {
			t.Fatalf("cube vmm: %v", err)
		}
		if o := p.outcome(); o != "shutdown" {
			t.Errorf("result %q, want outcome shutdown (guest reset)", p.result)
		}
		return p.serial.String()
	}
	con := boot(`echo @@l2 root=$(cat /etc/cube-vmtest) rng=$(head -c 64 /dev/hwrng | wc -c); echo cow-ok > /root/cow`)
	if !strings.Contains(con, "@@l2 root=cube-vmtest-rootfs-ok rng=64") {
		t.Fatalf("first boot: no marker with the base file and 64 random bytes:\n%s", indent(con))
	}
	if st, err := os.Stat(overlay); err != nil || st.Size() == 0 {
		t.Fatalf("overlay not written: %v", err)
	}
	con = boot(`echo @@l2 cow=$(cat /root/cow)`)
	if !strings.Contains(con, "@@l2 cow=cow-ok") {
		t.Fatalf("second boot: the file written in the first is not on the overlay:\n%s", indent(con))
	}
	if fileSum(t, base) != before {
		t.Fatal("the read-only base image changed")
	}
}

// vsockClient is an HTTP client whose connections go through the VMM's
// vsock bridge: connect to the unix socket, "CONNECT <port>\n", "OK ...\n".
func vsockClient(uds string, port int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			c, err := dl.DialContext(ctx, "unix", uds)
			if err != nil {
				return nil, err
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(c, "CONNECT %d\n", port)
			line, err := bufio.NewReader(io.LimitReader(c, 64)).ReadString('\n')
			// The reader may hold bytes past the line only if the
			// guest spoke first, which HTTP servers do not.
			if err != nil || !strings.HasPrefix(line, "OK ") {
				c.Close()
				return nil, fmt.Errorf("vsock handshake: %q, %v", line, err)
			}
			c.SetDeadline(time.Time{})
			return c, nil
		},
		DisableKeepAlives: false,
	}}
}

// rootAuth is envd's way of naming the user of a request.
var rootAuth = "Basic " + base64.StdEncoding.EncodeToString([]byte("root:"))

// runInGuest runs a shell command through cube-agent's process API.
func runInGuest(t *testing.T, c processconnect.ProcessClient, script string) (string, int32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	no := false
	req := connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", script}}, Stdin: &no})
	req.Header().Set("Authorization", rootAuth)
	st, err := c.Start(ctx, req)
	if err != nil {
		t.Fatalf("start %q: %v", script, err)
	}
	defer st.Close()
	var out strings.Builder
	code := int32(-1)
	for st.Receive() {
		switch e := st.Msg().GetEvent().GetEvent().(type) {
		case *pb.ProcessEvent_Data:
			out.Write(e.Data.GetStdout())
			out.Write(e.Data.GetStderr())
		case *pb.ProcessEvent_End:
			code = e.End.GetExitCode()
		}
	}
	if err := st.Err(); err != nil {
		t.Fatalf("%q: stream: %v", script, err)
	}
	return out.String(), code
}

// TestAgentOverVsockAndTap boots the busybox root with cube-agent as PID 1,
// a virtio-net on a tap in L1 and the vsock bridge. Through the agent's
// envd API over vsock it runs a command, checks IPv6 loopback, reads a file
// of the copy-on-write disk, and pings L1 over the tap; L1 pings the guest
// back.
func TestAgentOverVsockAndTap(t *testing.T) {
	d := dir(t)
	cubeBin(t)
	const tapName, hostIP, guestIP = "cubetap0", "172.30.0.1", "172.30.0.2"
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: tapName}, Mode: netlink.TUNTAP_MODE_TAP,
		Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_ONE_QUEUE}
	if err := netlink.LinkAdd(tap); err != nil {
		t.Fatalf("create tap: %v", err)
	}
	t.Cleanup(func() { netlink.LinkDel(tap) })
	addr, _ := netlink.ParseAddr(hostIP + "/24")
	if err := netlink.AddrAdd(tap, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(tap); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	uds := filepath.Join(tmp, "vsock.sock")
	p := startVMM(t, vmmapi.Options{
		Kernel: filepath.Join(d, "guest", "bzImage"), MemMiB: 512, VCPUs: 1,
		Disks:    []vmmapi.Disk{{Base: filepath.Join(d, "guest", "rootfs.ext4"), Overlay: filepath.Join(tmp, "overlay.cow")}},
		TapName:  tapName,
		VsockUDS: uds,
		Cmdline: "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw init=/sbin/cube-agent " +
			"cube.ip=" + guestIP + "/24 cube.gw=" + hostIP + " cube.hostname=vmtest",
	})
	hc := vsockClient(uds, 49983)
	start := time.Now()
	for {
		select {
		case <-p.done:
			t.Fatalf("cube vmm exited before the agent answered: %v %s", p.err, p.result)
		default:
		}
		resp, err := hc.Get("http://agent/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				break
			}
		}
		if time.Since(start) > 3*time.Minute {
			t.Fatalf("agent not healthy over vsock after 3 minutes: %v", err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("agent healthy over vsock %.2fs after the VMM started", time.Since(start).Seconds())

	pc := processconnect.NewProcessClient(hc, "http://agent")
	out, code := runInGuest(t, pc, "echo hello from $(hostname) on $(uname -r); id -u")
	if code != 0 || !strings.Contains(out, "hello from vmtest on 6.1") || !strings.Contains(out, "\n0\n") {
		t.Fatalf("command over vsock: exit %d, output %q", code, out)
	}

	// IPv6 is in the guest kernel: loopback has ::1.
	if out, _ := runInGuest(t, pc, "cat /proc/net/if_inet6"); !strings.Contains(out, "00000000000000000000000000000001") {
		t.Errorf("no ::1 in the guest (/proc/net/if_inet6: %q)", out)
	}

	req, _ := http.NewRequest("GET", "http://agent/files?path=/etc/cube-vmtest&username=root", nil)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "cube-vmtest-rootfs-ok\n" {
		t.Fatalf("GET /files: %d %q", resp.StatusCode, body)
	}

	out, code = runInGuest(t, pc, "ping -c 2 -W 5 "+hostIP)
	if code != 0 {
		t.Fatalf("guest ping of L1 over the tap: exit %d\n%s", code, out)
	}
	if out, err := exec.Command("ping", "-c", "2", "-W", "5", guestIP).CombinedOutput(); err != nil {
		t.Fatalf("L1 ping of the guest: %v\n%s", err, out)
	}

	// `poweroff` in the guest (busybox: SIGUSR2 to PID 1, the agent)
	// must end the VM where the VMM sees it, although the guest has no
	// ACPI: the agent powers off through the keyboard-controller reset.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	no := false
	preq := connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "poweroff"}}, Stdin: &no})
	preq.Header().Set("Authorization", rootAuth)
	if st, err := pc.Start(ctx, preq); err == nil {
		for st.Receive() {
		}
		st.Close()
	}
	if err := p.wait(t, 2*time.Minute); err != nil {
		t.Logf("cube vmm after the guest's poweroff: %v", err)
	}
	if p.outcome() != "shutdown" {
		t.Fatalf("after poweroff in the guest the VMM reports %s", p.result)
	}
	t.Logf("guest poweroff: %s", strings.TrimSpace(p.result))
}
