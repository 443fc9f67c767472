//go:build linux

// Package pid1 is what cube-agent does when it is a microVM's init: mount
// the API filesystems, name the host, bring up loopback and eth0 (from
// `cube.ip=` / `cube.gw=` / `cube.dns=` / `cube.hostname=` on the kernel
// command line), reap orphaned zombies, and shut down cleanly on SIGTERM.
// Every step tolerates an environment where it was already done (gVisor
// mounts /proc itself, for example).
package pid1

import (
	"context"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/agent/reaper"
)

type mountSpec struct {
	src, target, fstype string
	flags               uintptr
	data                string
}

var mounts = []mountSpec{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
}

// Cmdline holds the cube.* parameters of the kernel command line.
type Cmdline struct {
	IP       string // CIDR, e.g. 169.254.0.21/30
	Gateway  string
	DNS      string
	Hostname string
}

// ParseCmdline extracts cube.* keys from a kernel command line.
func ParseCmdline(s string) Cmdline {
	var c Cmdline
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "cube.ip":
			c.IP = v
		case "cube.gw":
			c.Gateway = v
		case "cube.dns":
			c.DNS = v
		case "cube.hostname":
			c.Hostname = v
		}
	}
	return c
}

// Setup prepares the machine. Failures are logged, never fatal: a
// half-set-up sandbox with a working agent beats none.
func Setup(log *slog.Logger) {
	for _, m := range mounts {
		if mounted(m.target) {
			continue
		}
		_ = os.MkdirAll(m.target, 0o755)
		if err := unix.Mount(m.src, m.target, m.fstype, m.flags, m.data); err != nil {
			log.Warn("pid1: mount", "target", m.target, "err", err)
		}
	}
	if _, err := os.Lstat("/dev/ptmx"); err != nil {
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}
	b, _ := os.ReadFile("/proc/cmdline")
	c := ParseCmdline(string(b))
	host := c.Hostname
	if host == "" {
		host = "sandbox"
	}
	if err := unix.Sethostname([]byte(host)); err != nil {
		log.Warn("pid1: hostname", "err", err)
	}
	if err := LinkUp("lo"); err != nil {
		log.Warn("pid1: loopback", "err", err)
	}
	if c.IP != "" {
		if err := configureEth0(c); err != nil {
			log.Warn("pid1: eth0", "err", err)
		}
	}
	if c.DNS != "" {
		_ = os.WriteFile("/etc/resolv.conf", []byte("nameserver "+c.DNS+"\n"), 0o644)
	}
	if err := os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"); err != nil {
		log.Warn("pid1: PATH", "err", err)
	}
}

func mounted(target string) bool {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && f[1] == target {
			return true
		}
	}
	return false
}

// LinkUp sets a link up by name.
func LinkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(l)
}

func configureEth0(c Cmdline) error {
	l, err := netlink.LinkByName("eth0")
	if err != nil {
		return err
	}
	addr, err := netlink.ParseAddr(c.IP)
	if err != nil {
		return err
	}
	if err := netlink.AddrReplace(l, addr); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return err
	}
	if c.Gateway != "" {
		gw := net.ParseIP(c.Gateway)
		if gw == nil {
			return &net.ParseError{Type: "IP address", Text: c.Gateway}
		}
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw})
	}
	return nil
}

// Reap reaps orphaned zombies on SIGCHLD (and every few seconds) until ctx
// ends.
func Reap(ctx context.Context, log *slog.Logger) {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGCHLD)
	defer signal.Stop(ch)
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
		case <-t.C:
		}
		if n := reaper.ReapOrphans(); n > 0 {
			log.Debug("pid1: reaped", "count", n)
		}
	}
}

// Shutdown terminates every process, syncs and powers off. It returns only
// if power-off is impossible (then the caller exits).
func Shutdown(log *slog.Logger) {
	_ = unix.Kill(-1, unix.SIGTERM)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		reaper.ReapOrphans()
		if !hasChildren() {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	cmdline, _ := os.ReadFile("/proc/cmdline")
	if err := unix.Reboot(PowerOffCmd(string(cmdline))); err != nil {
		log.Warn("pid1: power off", "err", err)
	}
}

// PowerOffCmd is the reboot(2) command that ends this machine. A Cube
// microVM has no ACPI, so LINUX_REBOOT_CMD_POWER_OFF would leave it halted
// with its devices shut down and the VMM none the wiser; its kernel runs
// with reboot=k and the VMM takes the keyboard-controller reset for a
// shutdown, so there a restart is how the guest powers off.
func PowerOffCmd(cmdline string) int {
	for _, w := range strings.Fields(cmdline) {
		if w == "reboot=k" || w == "reboot=kbd" {
			return unix.LINUX_REBOOT_CMD_RESTART
		}
	}
	return unix.LINUX_REBOOT_CMD_POWER_OFF
}

func hasChildren() bool {
	var ws unix.WaitStatus
	_, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
	return err != unix.ECHILD
}
