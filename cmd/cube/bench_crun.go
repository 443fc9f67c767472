//go:build linux

package main

import (
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The crun peer of `cube bench vmm` and `cube bench restore`: `crun run`
// of /bin/true from a busybox-static rootfs, timed in a re-executed copy
// of this binary inside a private mount namespace with cgroup2 mounted
// (crun needs it at /sys/fs/cgroup; the host may have v1).

// staticBusybox is the first statically linked busybox on the host.
func staticBusybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		dynamic := false
		for _, ph := range f.Progs {
			dynamic = dynamic || ph.Type == elf.PT_INTERP
		}
		f.Close()
		if !dynamic {
			return p, nil
		}
	}
	return "", errors.New("no static busybox (apt-get install busybox-static)")
}

// makeCrunBundle builds, unless it is there already, an OCI bundle in
// bundle whose rootfs holds busybox-static as /bin/true.
func makeCrunBundle(bundle string) error {
	crunPath, err := exec.LookPath("crun")
	if err != nil {
		return errors.New("crun not installed (apt-get install crun)")
	}
	bb, err := staticBusybox()
	if err != nil {
		return err
	}
	config := filepath.Join(bundle, "config.json")
	if _, err := os.Stat(config); err == nil {
		return nil
	}
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			return err
		}
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "busybox"), b, 0o755); err != nil {
		return err
	}
	if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", "true")); err != nil {
		return err
	}
	spec := exec.Command(crunPath, "spec")
	spec.Dir = bundle
	if o, err := spec.CombinedOutput(); err != nil {
		return fmt.Errorf("crun spec: %v: %s", err, o)
	}
	raw, err := os.ReadFile(config)
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return err
	}
	proc, _ := cfg["process"].(map[string]any)
	if proc == nil {
		return errors.New("crun spec: no process section")
	}
	proc["terminal"] = false
	proc["args"] = []string{"/bin/true"}
	raw, _ = json.MarshalIndent(cfg, "", "  ")
	return os.WriteFile(config, raw, 0o644)
}

// runCrunHelper re-executes this binary with args (a bench subcommand
// whose hidden flags reach crunHelper) in a new mount namespace and
// returns the latencies it prints.
func runCrunHelper(args ...string) ([]time.Duration, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	c := exec.Command(self, args...)
	c.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	out, err := c.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return nil, fmt.Errorf("crun helper: %v: %s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("crun helper: %v", err)
	}
	var ns []int64
	if err := json.Unmarshal(out, &ns); err != nil {
		return nil, fmt.Errorf("crun helper output %q: %v", out, err)
	}
	d := make([]time.Duration, len(ns))
	for i, v := range ns {
		d[i] = time.Duration(v)
	}
	return d, nil
}

// crunHelper runs in the private mount namespace of runCrunHelper: it
// mounts cgroup2, times n `crun run` of bundle on c workers and writes the
// latencies (ns) as JSON to w.
func crunHelper(w io.Writer, bundle string, n, c int) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, ""); err != nil {
		return fmt.Errorf("mount cgroup2: %w", err)
	}
	root, err := os.MkdirTemp("", "cube-bench-crun-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	res := make([]int64, n)
	err = parallel(n, c, func(i int) error {
		id := fmt.Sprintf("cubebench-%d-%d", os.Getpid(), i)
		cmd := exec.Command("crun", "--root", root, "--cgroup-manager=disabled", "run", "--bundle", bundle, id)
		t0 := time.Now()
		if o, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("crun run: %v: %s", err, o)
		}
		res[i] = int64(time.Since(t0))
		return nil
	})
	if err != nil {
		return err
	}
	return json.NewEncoder(w).Encode(res)
}
