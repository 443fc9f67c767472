//go:build linux

package pid1

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	pb "github.com/cubesandbox/cube/proto/process"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

func TestParseCmdline(t *testing.T) {
	c := ParseCmdline("console=ttyS0 cube.ip=169.254.0.21/30 cube.gw=169.254.0.22 cube.dns=1.1.1.1 cube.hostname=box quiet")
	if c.IP != "169.254.0.21/30" || c.Gateway != "169.254.0.22" || c.DNS != "1.1.1.1" || c.Hostname != "box" {
		t.Fatalf("%+v", c)
	}
	if c := ParseCmdline(""); c != (Cmdline{}) {
		t.Fatalf("empty: %+v", c)
	}
}

func agentBinary(t *testing.T) string {
	if d := os.Getenv("CUBE_BIN"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "cube-agent")); err == nil {
			return filepath.Join(d, "cube-agent")
		}
	}
	bin := filepath.Join(t.TempDir(), "cube-agent")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/cubesandbox/cube/cmd/cube-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build cube-agent: %v\n%s", err, out)
	}
	return bin
}

// TestAgentAsPID1 runs the real agent binary as PID 1 of fresh PID, mount,
// UTS and network namespaces (what a microVM gives it) and checks the
// init duties through its own API: hostname, loopback up, orphaned
// zombies reaped, clean exit on SIGTERM.
func TestAgentAsPID1(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for namespaces; ParseCmdline is tested without it")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare (util-linux) not installed")
	}
	bin := agentBinary(t)
	// The socket lives outside /tmp: the agent mounts a fresh tmpfs there.
	sockDir, err := os.MkdirTemp("/var/tmp", "cube-pid1-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "envd.sock")
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount", "--uts", "--net", "--mount-proc", "--kill-child",
		bin, "--envd-addr", "unix:"+sock, "--interp-addr", "", "--ensure-user=false", "--vsock=false", "--log-level=warn")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	// The template's start command, as the gVisor runtime hands it over.
	cmd.Env = append(os.Environ(), `CUBE_START_CMD=["/bin/sh","-c","echo started $FOO; exec sleep 600"]`, "FOO=bar")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	c := processconnect.NewProcessClient(hc, "http://agent", connect.WithProtoJSON())
	runSh := func(script string) string {
		t.Helper()
		f := false
		st, err := c.Start(context.Background(), connect.NewRequest(&pb.StartRequest{
			Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}}, Stdin: &f}))
		if err != nil {
			t.Fatal(err)
		}
		var out string
		for st.Receive() {
			out += string(st.Msg().Event.GetData().GetStdout())
		}
		if st.Err() != nil {
			t.Fatal(st.Err())
		}
		return out
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			if res, err := hc.Get("http://agent/health"); err == nil && res.StatusCode == 204 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("agent did not come up as PID 1")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := strings.TrimSpace(runSh("echo $PPID")); got != "1" {
		t.Fatalf("commands are not children of PID 1: PPID=%q", got)
	}
	// The start command runs, a child of PID 1 with the agent's env.
	var st struct {
		State string
		Pid   int
		Log   string
	}
	for {
		res, err := hc.Get("http://agent/start")
		if err != nil {
			t.Fatal(err)
		}
		err = json.NewDecoder(res.Body).Decode(&st)
		res.Body.Close()
		if err != nil || st.State != "running" {
			t.Fatalf("start command: %+v %v", st, err)
		}
		if strings.Contains(st.Log, "started bar") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("start command output: %q", st.Log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := strings.TrimSpace(runSh("cut -d' ' -f4 /proc/" + strconv.Itoa(st.Pid) + "/stat; echo ${CUBE_START_CMD:-unset}")); got != "1\nunset" {
		t.Fatalf("start command's parent, CUBE_START_CMD in processes: %q", got)
	}
	if got := strings.TrimSpace(runSh("hostname")); got != "sandbox" {
		t.Fatalf("hostname %q", got)
	}
	if got := runSh("ip -o link show lo 2>&1 || cat /proc/net/dev"); !strings.Contains(got, "UP") {
		t.Fatalf("loopback not up: %q", got)
	}
	// Orphan a child: it is re-parented to the agent, which must reap it.
	runSh("(sleep 0.3 &) ; true")
	// Let the orphan exit, then wait (however loaded the host) for no
	// zombie to be left.
	time.Sleep(500 * time.Millisecond)
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		zombies := runSh(`n=0; for f in /proc/[0-9]*/stat; do s=$(cut -d' ' -f3 "$f" 2>/dev/null); [ "$s" = Z ] && n=$((n+1)); done; echo $n`)
		if strings.TrimSpace(zombies) == "0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s zombies left", strings.TrimSpace(zombies))
		}
	}
	// SIGTERM to the agent (PID 1 inside): clean shutdown.
	child := childOf(cmd.Process.Pid)
	if child == 0 {
		t.Fatal("cannot find the agent process")
	}
	_ = syscall.Kill(child, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not exit on SIGTERM")
	}
}

func childOf(pid int) int {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(pid) + "/children")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(f[0])
	return n
}

func TestPowerOffCmd(t *testing.T) {
	for cmdline, want := range map[string]int{
		"console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda": unix.LINUX_REBOOT_CMD_RESTART,
		"reboot=kbd":                  unix.LINUX_REBOOT_CMD_RESTART,
		"console=ttyS0 root=/dev/vda": unix.LINUX_REBOOT_CMD_POWER_OFF,
		"reboot=t":                    unix.LINUX_REBOOT_CMD_POWER_OFF,
		"cube.reboot=k":               unix.LINUX_REBOOT_CMD_POWER_OFF,
		"":                            unix.LINUX_REBOOT_CMD_POWER_OFF,
	} {
		if got := PowerOffCmd(cmdline); got != want {
			t.Errorf("PowerOffCmd(%q) = %#x, want %#x", cmdline, got, want)
		}
	}
}
