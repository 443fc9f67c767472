//go:build linux

package vmmapi

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/jail"
)

// TestSuperviseChild: a child process killed through the supervisor is
// reaped by it (exit status known), its cgroup and socket file removed.
func TestSuperviseChild(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	var cg *jail.Cgroup
	if os.Geteuid() == 0 && jail.CgroupsAvailable() == nil {
		var err error
		if cg, err = jail.CreateCgroup("test-supervise-"+strconv.Itoa(pid), jail.Limits{PidsMax: 4}); err != nil {
			t.Fatal(err)
		}
		if err := cg.Add(pid); err != nil {
			cg.Remove()
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "vmm.sock")
	os.WriteFile(sock, nil, 0o600)
	s, err := Supervise(pid, cg, sock)
	if err != nil {
		t.Fatal(err)
	}
	if s.Exited() {
		t.Fatal("exited at once")
	}
	if !s.Kill(10 * time.Second) {
		t.Fatal("not seen exiting after SIGKILL")
	}
	if e := s.Exit(); !e.Reaped || e.Signal != syscall.SIGKILL {
		t.Fatalf("exit %s, want reaped, SIGKILL", e)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		t.Fatal("child not reaped")
	}
	if cg != nil {
		for _, d := range cg.Dirs {
			if _, err := os.Stat(d); err == nil {
				t.Errorf("cgroup %s left", d)
			}
		}
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("socket left")
	}
	if err := s.Signal(syscall.SIGKILL); err != nil {
		t.Errorf("signal after exit: %v", err)
	}
}

// TestSuperviseExitCode: a child that exits by itself with a code.
func TestSuperviseExitCode(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 0.05; exit 7")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s, err := Supervise(cmd.Process.Pid, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Process.Release()
	if !s.WaitFor(10 * time.Second) {
		t.Fatal("exit not seen")
	}
	if e := s.Exit(); !e.Reaped || e.Code != 7 || e.Signal != 0 {
		t.Fatalf("exit %s, want code 7", e)
	}
}

// TestSuperviseNotChild: a process that is another process's child (as
// an adopted VMM is init's): its exit is seen, the parent reaps it.
func TestSuperviseNotChild(t *testing.T) {
	sh := exec.Command("sh", "-c", "sleep 60 & echo $!; wait")
	out, _ := sh.StdoutPipe()
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	defer sh.Wait()
	defer sh.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	s, err := Supervise(pid, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if s.Exited() {
		t.Fatal("exited at once")
	}
	if !s.Kill(10 * time.Second) {
		t.Fatal("not seen exiting")
	}
	if e := s.Exit(); e.Reaped {
		t.Fatalf("exit %s: reaped here although not our child", e)
	}
	if err := sh.Wait(); err != nil {
		t.Fatalf("the parent shell: %v", err)
	}
	if _, err := Supervise(pid, nil, ""); err == nil {
		t.Error("supervising a reaped pid succeeded")
	}
}
