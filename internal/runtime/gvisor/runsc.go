//go:build linux

package gvisor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// runsc runs the runsc binary with Cube's global flags.
type runsc struct {
	path     string
	root     string // --root: runsc's container state
	platform string
}

func (r *runsc) args(diskMB int, sub ...string) []string {
	a := []string{
		"--root=" + r.root,
		"--platform=" + r.platform,
		"--network=sandbox",
		fmt.Sprintf("--overlay2=root:memory,size=%dm", diskMB),
	}
	return append(a, sub...)
}

// run executes a runsc subcommand that finishes (checkpoint, delete, ...).
func (r *runsc) run(ctx context.Context, diskMB int, sub ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.path, r.args(diskMB, sub...)...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("runsc %s: %w: %s", sub[0], err, lastLines(out.String(), 5))
	}
	return out.Bytes(), nil
}

// start runs `runsc run --detach` or `runsc restore --detach`. The
// sandbox keeps the stdout/stderr it was started with, so they go to a
// file (a pipe would never reach EOF).
func (r *runsc) start(ctx context.Context, diskMB int, logPath string, sub ...string) error {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := exec.CommandContext(ctx, r.path, r.args(diskMB, sub...)...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(logPath)
		return fmt.Errorf("runsc %s: %w: %s", sub[0], err, lastLines(string(b), 5))
	}
	return nil
}

type runscState struct {
	ID     string `json:"id"`
	Pid    int    `json:"pid"`
	Status string `json:"status"`
}

// state returns the container's status ("running", "stopped", ...) or
// "" if runsc does not know it.
func (r *runsc) state(ctx context.Context, cid string) string {
	out, err := r.run(ctx, 1, "state", cid)
	if err != nil {
		return ""
	}
	var s runscState
	if json.Unmarshal(out, &s) != nil {
		return ""
	}
	return s.Status
}

// list returns the ids of the containers in runsc's root.
func (r *runsc) list(ctx context.Context) []string {
	ents, _ := os.ReadDir(r.root)
	var out []string
	for _, e := range ents {
		// runsc keeps <cid>_sandbox:<cid>.state files and lock files.
		n := e.Name()
		if i := strings.Index(n, "_sandbox:"); i > 0 && strings.HasSuffix(n, ".state") {
			out = append(out, n[:i])
		}
	}
	return out
}

// destroy force-deletes the container, then kills any runsc process left
// for it (a runsc killed mid-create may leave a sandbox or gofer that the
// state file does not know).
func (r *runsc) destroy(ctx context.Context, cid string) {
	r.run(ctx, 1, "delete", "--force", cid)
	for _, pid := range r.processes(cid) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(r.processes(cid)) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	// State files of a container whose processes are gone.
	matches, _ := filepath.Glob(filepath.Join(r.root, cid+"_sandbox:*"))
	for _, m := range matches {
		os.RemoveAll(m)
	}
	removeCgroups(cid)
}

// processes returns the pids of runsc processes (CLI, sandbox, gofer) that
// belong to container cid in this runtime's root.
func (r *runsc) processes(cid string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	rootArg := []byte("--root=" + r.root + "\x00")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(b, rootArg) {
			continue
		}
		for _, a := range bytes.Split(b, []byte{0}) {
			if string(a) == cid || string(a) == "--id="+cid || strings.HasSuffix(string(a), "/"+cid) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
