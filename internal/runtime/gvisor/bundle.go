//go:build linux

package gvisor

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
)

// Minimal OCI runtime spec types: only what Cube writes.
type ociSpec struct {
	OCIVersion string     `json:"ociVersion"`
	Process    ociProcess `json:"process"`
	Root       ociRoot    `json:"root"`
	Hostname   string     `json:"hostname"`
	Mounts     []ociMount `json:"mounts"`
	Linux      ociLinux   `json:"linux"`
}

type ociProcess struct {
	User         ociUser             `json:"user"`
	Args         []string            `json:"args"`
	Env          []string            `json:"env"`
	Cwd          string              `json:"cwd"`
	Capabilities map[string][]string `json:"capabilities"`
	Rlimits      []ociRlimit         `json:"rlimits,omitempty"`
}

type ociUser struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
}

type ociRlimit struct {
	Type string `json:"type"`
	Hard uint64 `json:"hard"`
	Soft uint64 `json:"soft"`
}

type ociRoot struct {
	Path     string `json:"path"`
	Readonly bool   `json:"readonly"`
}

type ociMount struct {
	Destination string   `json:"destination"`
	Type        string   `json:"type"`
	Source      string   `json:"source"`
	Options     []string `json:"options,omitempty"`
}

type ociLinux struct {
	CgroupsPath string         `json:"cgroupsPath"`
	Resources   ociResources   `json:"resources"`
	Namespaces  []ociNamespace `json:"namespaces"`
}

type ociResources struct {
	Memory *ociMemory `json:"memory,omitempty"`
	CPU    *ociCPU    `json:"cpu,omitempty"`
}

type ociMemory struct {
	Limit int64 `json:"limit"`
}

type ociCPU struct {
	Quota  int64  `json:"quota"`
	Period uint64 `json:"period"`
}

type ociNamespace struct {
	Type string `json:"type"`
	Path string `json:"path,omitempty"`
}

// capabilities given to the sandbox's init (cube-agent runs as root and
// drops to the request's user). They are gVisor's virtualised capabilities.
var capabilities = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
	"CAP_NET_RAW", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP",
	"CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_NET_ADMIN",
}

// bundleParams are the inputs of a sandbox's config.json. A restore must
// use the same process, root and mounts as the checkpointed container;
// only cgroups, limits and the network namespace change.
type bundleParams struct {
	RootfsDir string            `json:"rootfsDir"`
	Cmd       []string          `json:"cmd"`
	Env       map[string]string `json:"env"`
	Workdir   string            `json:"workdir"`
}

func writeBundle(dir string, p bundleParams, cid, netnsPath string, cpus, memMB int) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}
	keys := make([]string, 0, len(p.Env))
	for k := range p.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+p.Env[k])
	}
	cwd := p.Workdir
	if cwd == "" {
		cwd = "/"
	}
	s := ociSpec{
		OCIVersion: "1.0.2",
		Process: ociProcess{
			Args: p.Cmd, Env: env, Cwd: cwd,
			Capabilities: map[string][]string{
				"bounding": capabilities, "effective": capabilities, "permitted": capabilities,
			},
			Rlimits: []ociRlimit{{Type: "RLIMIT_NOFILE", Hard: 1 << 20, Soft: 1 << 20}},
		},
		// Read-write from the OCI point of view; runsc's --overlay2=root:memory
		// puts every write in an in-sandbox upper layer, so the template's
		// directory is never modified.
		Root:     ociRoot{Path: p.RootfsDir},
		Hostname: "sandbox",
		Mounts: []ociMount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts"},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "nodev", "mode=1777"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"ro", "nosuid", "nodev", "noexec"}},
		},
		Linux: ociLinux{
			CgroupsPath: "/" + cgroupParent + "/" + cid,
			Namespaces: []ociNamespace{
				{Type: "pid"}, {Type: "ipc"}, {Type: "uts"}, {Type: "mount"},
				{Type: "network", Path: netnsPath},
			},
		},
	}
	if memMB > 0 {
		s.Linux.Resources.Memory = &ociMemory{Limit: int64(memMB) << 20}
	}
	if cpus > 0 {
		s.Linux.Resources.CPU = &ociCPU{Quota: int64(cpus) * cpuPeriodUS, Period: cpuPeriodUS}
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600)
}
