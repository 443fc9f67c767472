//go:build linux

package gvisor

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// cgroupRoot is the cgroup v1 hierarchy root; runsc creates
// <ctrl>/<cgroupParent>/<cid> in every controller from the OCI spec and
// removes it on delete.
const (
	cgroupRoot   = "/sys/fs/cgroup"
	cgroupParent = "cube-gvisor"
	cpuPeriodUS  = 100000
)

func cgroupDir(ctrl, cid string) string {
	return filepath.Join(cgroupRoot, ctrl, cgroupParent, cid)
}

func readUint(path string) (uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}

// setLimits rewrites a running sandbox's cgroup limits (a warm-pool
// sandbox handed to a create with other resources).
func setLimits(cid string, cpus, memMB int) error {
	if memMB > 0 {
		if err := os.WriteFile(filepath.Join(cgroupDir("memory", cid), "memory.limit_in_bytes"),
			[]byte(strconv.FormatInt(int64(memMB)<<20, 10)), 0); err != nil {
			return err
		}
	}
	if cpus > 0 {
		if err := os.WriteFile(filepath.Join(cgroupDir("cpu", cid), "cpu.cfs_quota_us"),
			[]byte(strconv.Itoa(cpus*cpuPeriodUS)), 0); err != nil {
			return err
		}
	}
	return nil
}

// cgroupLeftovers lists the controllers that still have cid's directory.
func cgroupLeftovers(cid string) []string {
	var out []string
	ents, _ := os.ReadDir(cgroupRoot)
	for _, e := range ents {
		if _, err := os.Stat(cgroupDir(e.Name(), cid)); err == nil {
			out = append(out, cgroupDir(e.Name(), cid))
		}
	}
	return out
}

// removeCgroups removes cid's (empty) cgroup directories that runsc left.
func removeCgroups(cid string) {
	for _, d := range cgroupLeftovers(cid) {
		os.Remove(d)
	}
}

// listCgroups returns the container ids that have a cgroup under our parent.
func listCgroups() []string {
	ents, _ := os.ReadDir(filepath.Join(cgroupRoot, "memory", cgroupParent))
	var out []string
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}
