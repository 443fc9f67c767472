//go:build linux

package jail

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// CgroupRoot is where cgroup hierarchies are mounted.
var CgroupRoot = "/sys/fs/cgroup"

// Limits for a VMM cgroup. Zero fields are left unlimited.
type Limits struct {
	MemoryBytes int64   // memory.limit_in_bytes (v1) / memory.max (v2)
	PidsMax     int     // pids.max
	CPUs        float64 // CFS quota in CPUs
}

// Cgroup is a VMM's cgroup: one directory per v1 controller (cpu,
// memory, pids), or one v2 directory on a unified-only host. It is
// created as "cube-vmm/<name>" below the creating process's own cgroup,
// so the VMM stays inside whatever hierarchy its launcher runs in.
type Cgroup struct {
	Name string
	V2   bool
	Dirs []string
}

var cgroupName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// selfPaths returns this process's cgroup path per v1 controller and the
// v2 path (key "").
func selfPaths() (map[string]string, error) {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			m[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			m[c] = parts[2]
		}
	}
	return m, sc.Err()
}

func writeFile(dir, file, val string) error {
	return os.WriteFile(filepath.Join(dir, file), []byte(val), 0o644)
}

// CgroupsAvailable reports whether CreateCgroup can work here: a v2
// hierarchy with controllers, or the v1 cpu, memory and pids controllers.
func CgroupsAvailable() error {
	if _, err := os.Stat(filepath.Join(CgroupRoot, "cgroup.controllers")); err == nil {
		return nil
	}
	paths, err := selfPaths()
	if err != nil {
		return err
	}
	for _, ctrl := range []string{"cpu", "memory", "pids"} {
		if _, ok := paths[ctrl]; !ok {
			return fmt.Errorf("cgroup v1 controller %s is not mounted", ctrl)
		}
		if _, err := os.Stat(filepath.Join(CgroupRoot, ctrl)); err != nil {
			return err
		}
	}
	return nil
}

// CreateCgroup makes the cgroup and applies limits.
func CreateCgroup(name string, l Limits) (*Cgroup, error) {
	if !cgroupName.MatchString(name) {
		return nil, fmt.Errorf("cgroup name %q: use letters, digits, '_', '.', '-'", name)
	}
	paths, err := selfPaths()
	if err != nil {
		return nil, fmt.Errorf("read /proc/self/cgroup: %w", err)
	}
	c := &Cgroup{Name: name}
	if _, err := os.Stat(filepath.Join(CgroupRoot, "cgroup.controllers")); err == nil {
		c.V2 = true
		dir := filepath.Join(CgroupRoot, paths[""], "cube-vmm", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("cgroup: %w", err)
		}
		c.Dirs = []string{dir}
		_ = writeFile(filepath.Dir(dir), "cgroup.subtree_control", "+cpu +memory +pids")
		if l.MemoryBytes > 0 {
			if err := writeFile(dir, "memory.max", strconv.FormatInt(l.MemoryBytes, 10)); err != nil {
				return c, errors.Join(err, c.Remove())
			}
		}
		if l.PidsMax > 0 {
			if err := writeFile(dir, "pids.max", strconv.Itoa(l.PidsMax)); err != nil {
				return c, errors.Join(err, c.Remove())
			}
		}
		if l.CPUs > 0 {
			if err := writeFile(dir, "cpu.max", fmt.Sprintf("%d 100000", int(l.CPUs*100000))); err != nil {
				return c, errors.Join(err, c.Remove())
			}
		}
		return c, nil
	}
	for _, ctrl := range []string{"cpu", "memory", "pids"} {
		p, ok := paths[ctrl]
		if !ok {
			return c, errors.Join(fmt.Errorf("cgroup v1 controller %s is not mounted", ctrl), c.Remove())
		}
		dir := filepath.Join(CgroupRoot, ctrl, p, "cube-vmm", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return c, errors.Join(fmt.Errorf("cgroup: %w", err), c.Remove())
		}
		c.Dirs = append(c.Dirs, dir)
		var err error
		switch ctrl {
		case "memory":
			if l.MemoryBytes > 0 {
				err = writeFile(dir, "memory.limit_in_bytes", strconv.FormatInt(l.MemoryBytes, 10))
			}
		case "pids":
			if l.PidsMax > 0 {
				err = writeFile(dir, "pids.max", strconv.Itoa(l.PidsMax))
			}
		case "cpu":
			if l.CPUs > 0 {
				if err = writeFile(dir, "cpu.cfs_period_us", "100000"); err == nil {
					err = writeFile(dir, "cpu.cfs_quota_us", strconv.Itoa(int(l.CPUs*100000)))
				}
			}
		}
		if err != nil {
			return c, errors.Join(fmt.Errorf("cgroup %s: %w", ctrl, err), c.Remove())
		}
	}
	return c, nil
}

// Add moves pid (every thread of it) into the cgroup.
func (c *Cgroup) Add(pid int) error {
	for _, d := range c.Dirs {
		if err := writeFile(d, "cgroup.procs", strconv.Itoa(pid)); err != nil {
			return fmt.Errorf("join cgroup %s: %w", d, err)
		}
	}
	return nil
}

// Remove deletes the cgroup directories (they must hold no process).
func (c *Cgroup) Remove() error {
	var errsOut []error
	for _, d := range c.Dirs {
		if err := os.Remove(d); err != nil && !os.IsNotExist(err) {
			errsOut = append(errsOut, err)
		}
		_ = os.Remove(filepath.Dir(d)) // the shared cube-vmm parent, if now empty
	}
	return errors.Join(errsOut...)
}

// Leaver moves the current process back to the parent cgroups and
// removes its own, using fds opened in advance (so it works under the
// seccomp filter, which refuses open).
type Leaver struct {
	c     *Cgroup
	procs []*os.File
}

// PrepareLeave opens the parents' cgroup.procs files.
func (c *Cgroup) PrepareLeave() (*Leaver, error) {
	l := &Leaver{c: c}
	for _, d := range c.Dirs {
		f, err := os.OpenFile(filepath.Join(filepath.Dir(filepath.Dir(d)), "cgroup.procs"), os.O_WRONLY, 0)
		if err != nil {
			l.close()
			return nil, err
		}
		l.procs = append(l.procs, f)
	}
	return l, nil
}

func (l *Leaver) close() {
	for _, f := range l.procs {
		f.Close()
	}
	l.procs = nil
}

// Leave moves this process out and removes the cgroup.
func (l *Leaver) Leave() error {
	pid := strconv.Itoa(os.Getpid())
	var errsOut []error
	for _, f := range l.procs {
		if _, err := f.Write([]byte(pid)); err != nil {
			errsOut = append(errsOut, err)
		}
	}
	l.close()
	return errors.Join(append(errsOut, l.c.Remove())...)
}
