// Package hostinfo inspects the host: which kind of virtualization it has
// (hardware KVM, KVM-PVM, none), which runtime Cube should use on it, and
// which tools Cube needs are missing. `cube doctor` prints its report.
package hostinfo

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

// Kind is the host's virtualization kind.
type Kind string

const (
	KVMHardware Kind = "kvm-hardware" // VT-x or AMD-V with kvm_intel/kvm_amd: microvm runtime
	KVMPVM      Kind = "kvm-pvm"      // KVM-PVM: no stock guest kernel boots; gvisor runtime
	NoKVM       Kind = "no-kvm"       // no /dev/kvm: gvisor runtime
)

// Probe holds what Detect looks at; tests replace the paths.
type Probe struct {
	Root string // prefix for /dev, /sys and /proc (empty = "/")
}

func (p Probe) path(s string) string { return p.Root + s }

// Kind returns the host's virtualization kind.
func (p Probe) Kind() Kind {
	if _, err := os.Stat(p.path("/dev/kvm")); err != nil {
		return NoKVM
	}
	if _, err := os.Stat(p.path("/sys/module/kvm_pvm")); err == nil {
		return KVMPVM
	}
	cpu, _ := os.ReadFile(p.path("/proc/cpuinfo"))
	flags := ""
	for _, line := range strings.Split(string(cpu), "\n") {
		if strings.HasPrefix(line, "flags") {
			flags = " " + line + " "
			break
		}
	}
	hasVirt := strings.Contains(flags, " vmx ") || strings.Contains(flags, " svm ")
	_, errI := os.Stat(p.path("/sys/module/kvm_intel"))
	_, errA := os.Stat(p.path("/sys/module/kvm_amd"))
	if hasVirt && (errI == nil || errA == nil) {
		return KVMHardware
	}
	return NoKVM
}

// RuntimeFor returns the runtime Cube picks on a host of kind k.
func RuntimeFor(k Kind) string {
	if k == KVMHardware {
		return "microvm"
	}
	return "gvisor"
}

// Check is one line of the doctor's report.
type Check struct {
	Name   string
	OK     bool
	Detail string
	Needed string // who needs it
}

// Checks reports what Cube needs on this host.
func (p Probe) Checks() []Check {
	var out []Check
	bin := func(name, needed string, alts ...string) {
		for _, n := range append([]string{name}, alts...) {
			if path, err := exec.LookPath(n); err == nil {
				out = append(out, Check{Name: name, OK: true, Detail: path, Needed: needed})
				return
			}
		}
		out = append(out, Check{Name: name, OK: false, Detail: "not found in PATH", Needed: needed})
	}
	file := func(name, path, needed string) {
		_, err := os.Stat(p.path(path))
		d := path
		if err != nil {
			d = path + " missing"
		}
		out = append(out, Check{Name: name, OK: err == nil, Detail: d, Needed: needed})
	}
	file("/dev/kvm", "/dev/kvm", "microvm runtime")
	file("/dev/net/tun", "/dev/net/tun", "microvm networking")
	file("cgroup v1 memory", "/sys/fs/cgroup/memory", "resource limits")
	bin("runsc", "gvisor runtime (make runsc)", "/var/cache/cube/bin/runsc")
	bin("mkfs.ext4", "templates (e2fsprogs)")
	bin("debootstrap", "built-in templates")
	bin("ip", "networking (iproute2)")
	bin("qemu-system-x86_64", "make vmtest (emulated SVM machine)")
	bin("node", "E2B SDK end-to-end tests")
	return out
}

// Report writes the doctor's report to w and returns the number of missing
// items.
func (p Probe) Report(w io.Writer) int {
	k := p.Kind()
	fmt.Fprintf(w, "host kind: %s\n", k)
	switch k {
	case KVMHardware:
		fmt.Fprintln(w, "  hardware virtualization with kvm_intel/kvm_amd: sandboxes run as microVMs")
	case KVMPVM:
		fmt.Fprintln(w, "  /dev/kvm is KVM-PVM (no vmx/svm): stock guest kernels cannot boot; sandboxes run under gVisor")
	case NoKVM:
		fmt.Fprintln(w, "  no usable /dev/kvm: sandboxes run under gVisor")
	}
	fmt.Fprintf(w, "runtime: %s\n", RuntimeFor(k))
	missing := 0
	for _, c := range p.Checks() {
		mark := "ok     "
		if !c.OK {
			mark = "MISSING"
			missing++
		}
		fmt.Fprintf(w, "  %s %-20s %-40s (%s)\n", mark, c.Name, c.Detail, c.Needed)
	}
	if missing == 0 {
		fmt.Fprintln(w, "nothing missing")
	} else {
		fmt.Fprintf(w, "%d missing: `make run` installs them\n", missing)
	}
	return missing
}
