//go:build linux

package jail

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// ValidName: 1-128 of [A-Za-z0-9_.-], starting with a letter or digit
// (cgroup names here; sandbox ids in the microVM runtime).
// (A hand-written check: the equivalent regexp with {0,127} keeps ~100
// KiB of compiled program alive in every VMM process.)
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '_' || c == '.' || c == '-'):
		default:
			return false
		}
	}
	return true
}

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
	if !ValidName(name) {
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

// OpenCgroup names the cgroup CreateCgroup(name) makes when called by
// this process or a child of it (below this process's own cgroups),
// without creating anything: a supervisor removes it once the VMM that a
// (now gone) launcher put there has exited.
func OpenCgroup(name string) (*Cgroup, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("cgroup name %q: use letters, digits, '_', '.', '-'", name)
	}
	paths, err := selfPaths()
	if err != nil {
		return nil, fmt.Errorf("read /proc/self/cgroup: %w", err)
	}
	c := &Cgroup{Name: name}
	if _, err := os.Stat(filepath.Join(CgroupRoot, "cgroup.controllers")); err == nil {
		c.V2 = true
		c.Dirs = []string{filepath.Join(CgroupRoot, paths[""], "cube-vmm", name)}
		return c, nil
	}
	for _, ctrl := range []string{"cpu", "memory", "pids"} {
		p, ok := paths[ctrl]
		if !ok {
			return nil, fmt.Errorf("cgroup v1 controller %s is not mounted", ctrl)
		}
		c.Dirs = append(c.Dirs, filepath.Join(CgroupRoot, ctrl, p, "cube-vmm", name))
	}
	return c, nil
}

// RemoveStale removes the cgroups cube-vmm/<prefix>* below this process's
// cgroups that hold no process (rmdir refuses populated ones): those of
// VMMs that exited while nobody supervised them. It returns the names
// removed.
func RemoveStale(prefix string) []string {
	if prefix == "" {
		return nil
	}
	paths, err := selfPaths()
	if err != nil {
		return nil
	}
	var parents []string
	if _, err := os.Stat(filepath.Join(CgroupRoot, "cgroup.controllers")); err == nil {
		parents = []string{filepath.Join(CgroupRoot, paths[""], "cube-vmm")}
	} else {
		for _, ctrl := range []string{"cpu", "memory", "pids"} {
			if p, ok := paths[ctrl]; ok {
				parents = append(parents, filepath.Join(CgroupRoot, ctrl, p, "cube-vmm"))
			}
		}
	}
	seen := map[string]bool{}
	var out []string
	for _, parent := range parents {
		ents, _ := os.ReadDir(parent)
		for _, e := range ents {
			if !e.IsDir() || !strings.HasPrefix(e.Name(), prefix) {
				continue
			}
			if os.Remove(filepath.Join(parent, e.Name())) == nil && !seen[e.Name()] {
				seen[e.Name()] = true
				out = append(out, e.Name())
			}
		}
		_ = os.Remove(parent) // the shared cube-vmm parent, if now empty
	}
	return out
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

// LimitFiles are a cgroup's limit files, opened for writing by the
// launcher and handed to the VMM as fds: a pre-started VMM learns its
// size only when told to restore, sets its limits once through them and
// closes them before it installs its seccomp filter (so a compromised
// VMM cannot raise its own limits). nil fields are absent.
type LimitFiles struct {
	V2             bool
	Mem, Pids, CPU *os.File
}

// OpenLimits opens the cgroup's memory, pids and CPU quota files (v1:
// the CFS period is set to 100 ms here; the quota is written by Apply).
func (c *Cgroup) OpenLimits() (*LimitFiles, error) {
	l := &LimitFiles{V2: c.V2}
	open := func(dir, name string) (*os.File, error) {
		return os.OpenFile(filepath.Join(dir, name), os.O_WRONLY, 0)
	}
	var err error
	if c.V2 {
		if len(c.Dirs) != 1 {
			return nil, fmt.Errorf("cgroup %s: no directory", c.Name)
		}
		d := c.Dirs[0]
		if l.Mem, err = open(d, "memory.max"); err == nil {
			if l.Pids, err = open(d, "pids.max"); err == nil {
				l.CPU, err = open(d, "cpu.max")
			}
		}
	} else {
		for _, d := range c.Dirs {
			if err != nil {
				break
			}
			switch {
			case fileIn(d, "memory.limit_in_bytes"):
				l.Mem, err = open(d, "memory.limit_in_bytes")
			case fileIn(d, "pids.max"):
				l.Pids, err = open(d, "pids.max")
			case fileIn(d, "cpu.cfs_quota_us"):
				if err = writeFile(d, "cpu.cfs_period_us", "100000"); err == nil {
					l.CPU, err = open(d, "cpu.cfs_quota_us")
				}
			}
		}
	}
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("cgroup %s limits: %w", c.Name, err)
	}
	return l, nil
}

func fileIn(dir, name string) bool {
	_, err := os.Stat(filepath.Join(dir, name))
	return err == nil
}

// Files returns the open files in the order Spec numbers them.
func (l *LimitFiles) Files() []*os.File {
	var out []*os.File
	for _, f := range []*os.File{l.Mem, l.Pids, l.CPU} {
		if f != nil {
			out = append(out, f)
		}
	}
	return out
}

// Spec describes the files as the child will see them when Files() are
// its fds first, first+1, ...: "v1,mem=5,pids=6,cpu=7".
func (l *LimitFiles) Spec(first int) string {
	s := "v1"
	if l.V2 {
		s = "v2"
	}
	fd := first
	for _, e := range []struct {
		k string
		f *os.File
	}{{"mem", l.Mem}, {"pids", l.Pids}, {"cpu", l.CPU}} {
		if e.f != nil {
			s += "," + e.k + "=" + strconv.Itoa(fd)
			fd++
		}
	}
	return s
}

// ParseLimitFDs adopts the fds named by a Spec string.
func ParseLimitFDs(s string) (*LimitFiles, error) {
	parts := strings.Split(s, ",")
	l := &LimitFiles{}
	switch parts[0] {
	case "v1":
	case "v2":
		l.V2 = true
	default:
		return nil, fmt.Errorf("limit fds %q: want v1 or v2 first", s)
	}
	for _, p := range parts[1:] {
		k, v, _ := strings.Cut(p, "=")
		fd, err := strconv.Atoi(v)
		if err != nil || fd < 3 {
			return nil, fmt.Errorf("limit fds %q: bad fd in %q", s, p)
		}
		f := os.NewFile(uintptr(fd), "cgroup:"+k)
		switch k {
		case "mem":
			l.Mem = f
		case "pids":
			l.Pids = f
		case "cpu":
			l.CPU = f
		default:
			return nil, fmt.Errorf("limit fds %q: unknown key %q", s, k)
		}
	}
	return l, nil
}

// Apply writes the limits (zero fields are skipped).
func (l *LimitFiles) Apply(lim Limits) error {
	put := func(f *os.File, v string) error {
		if f == nil {
			return nil
		}
		if _, err := f.Write([]byte(v)); err != nil {
			return fmt.Errorf("%s: %w", f.Name(), err)
		}
		return nil
	}
	var errsOut []error
	if lim.MemoryBytes > 0 {
		errsOut = append(errsOut, put(l.Mem, strconv.FormatInt(lim.MemoryBytes, 10)))
	}
	if lim.PidsMax > 0 {
		errsOut = append(errsOut, put(l.Pids, strconv.Itoa(lim.PidsMax)))
	}
	if lim.CPUs > 0 {
		q := strconv.Itoa(int(lim.CPUs * 100000))
		if l.V2 {
			q += " 100000"
		}
		errsOut = append(errsOut, put(l.CPU, q))
	}
	return errors.Join(errsOut...)
}

// Close closes the files.
func (l *LimitFiles) Close() {
	for _, f := range l.Files() {
		f.Close()
	}
	l.Mem, l.Pids, l.CPU = nil, nil, nil
}
