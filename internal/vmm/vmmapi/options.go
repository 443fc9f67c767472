// Package vmmapi is how the node drives `cube vmm` processes: Options
// (the VMM's command-line flags as a struct, one source of truth for both
// sides), the control protocol (HTTP+JSON on a unix socket), a Client,
// and Launch, which starts a hardened VMM process (own namespaces,
// cgroup, only the fds it needs, optional uid drop).
package vmmapi

import (
	"fmt"
	"strconv"
	"strings"
)

// Disk is a virtio-blk disk: a read-only base image and a sparse
// copy-on-write overlay file (created if missing).
type Disk struct {
	Base    string `json:"base"`
	Overlay string `json:"overlay,omitempty"`
	ID      string `json:"id,omitempty"`
}

// String renders the --disk flag value.
func (d Disk) String() string {
	s := "base=" + d.Base
	if d.Overlay != "" {
		s += ",overlay=" + d.Overlay
	}
	if d.ID != "" {
		s += ",id=" + d.ID
	}
	return s
}

// ParseDisk parses "base=PATH[,overlay=PATH][,id=ID]" (a bare PATH is the
// base).
func ParseDisk(s string) (Disk, error) {
	var d Disk
	for _, part := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			if d.Base == "" {
				d.Base = part
				continue
			}
			return d, fmt.Errorf("disk %q: %q is not key=value", s, part)
		}
		switch k {
		case "base":
			d.Base = v
		case "overlay":
			d.Overlay = v
		case "id":
			d.ID = v
		default:
			return d, fmt.Errorf("disk %q: unknown key %q", s, k)
		}
	}
	if d.Base == "" {
		return d, fmt.Errorf("disk %q: no base image", s)
	}
	return d, nil
}

// Options configures one VMM process. Paths are opened by the VMM
// process itself unless an fd is given (fds are the process's own
// numbers, e.g. 3 for the first of exec.Cmd.ExtraFiles).
type Options struct {
	Kernel       string `json:"kernel"`
	KernelFormat string `json:"kernel_format,omitempty"` // auto, bzimage, elf, raw
	Initrd       string `json:"initrd,omitempty"`
	Cmdline      string `json:"cmdline,omitempty"`
	MemMiB       int    `json:"mem_mib"`
	VCPUs        int    `json:"vcpus"`

	Disks    []Disk `json:"disks,omitempty"`
	TapName  string `json:"tap_name,omitempty"`
	TapFD    int    `json:"tap_fd,omitempty"` // -1/0: none
	MAC      string `json:"mac,omitempty"`
	VsockUDS string `json:"vsock_uds,omitempty"`
	VsockCID uint32 `json:"vsock_cid,omitempty"`
	RNG      bool   `json:"rng,omitempty"`

	SerialLog string `json:"serial_log,omitempty"` // path, "-" = stdout, "" = discard
	APISocket string `json:"api_socket,omitempty"` // unix socket path to listen on
	APIFD     int    `json:"api_fd,omitempty"`     // inherited listening socket
	KVMFD     int    `json:"kvm_fd,omitempty"`     // inherited /dev/kvm

	MemFile       string `json:"mem_file,omitempty"` // map guest RAM from this file
	MemFileShared bool   `json:"mem_file_shared,omitempty"`
	NoStart       bool   `json:"no_start,omitempty"` // wait for POST /start
	ResultFile    string `json:"result_file,omitempty"`

	Cgroup     string `json:"cgroup,omitempty"` // join a new v1 cgroup of this name
	NoSeccomp  bool   `json:"no_seccomp,omitempty"`
	ExitOnStop bool   `json:"exit_on_stop,omitempty"` // unused: the process always exits when the VM stops
}

// Args renders o as `cube vmm` flags.
func (o Options) Args() []string {
	var a []string
	add := func(k, v string) {
		if v != "" {
			a = append(a, "--"+k+"="+v)
		}
	}
	addInt := func(k string, v int) {
		if v > 0 {
			a = append(a, "--"+k+"="+strconv.Itoa(v))
		}
	}
	flag := func(k string, v bool) {
		if v {
			a = append(a, "--"+k)
		}
	}
	add("kernel", o.Kernel)
	add("kernel-format", o.KernelFormat)
	add("initrd", o.Initrd)
	if o.Cmdline != "" {
		a = append(a, "--cmdline="+o.Cmdline)
	}
	addInt("mem", o.MemMiB)
	addInt("vcpus", o.VCPUs)
	for _, d := range o.Disks {
		a = append(a, "--disk="+d.String())
	}
	add("tap", o.TapName)
	addInt("tap-fd", o.TapFD)
	add("mac", o.MAC)
	add("vsock-uds", o.VsockUDS)
	if o.VsockCID != 0 {
		a = append(a, "--vsock-cid="+strconv.FormatUint(uint64(o.VsockCID), 10))
	}
	flag("rng", o.RNG)
	add("serial-log", o.SerialLog)
	add("api-socket", o.APISocket)
	addInt("api-fd", o.APIFD)
	addInt("kvm-fd", o.KVMFD)
	add("mem-file", o.MemFile)
	flag("mem-file-shared", o.MemFileShared)
	flag("no-start", o.NoStart)
	add("result-file", o.ResultFile)
	add("cgroup", o.Cgroup)
	flag("no-seccomp", o.NoSeccomp)
	return a
}
