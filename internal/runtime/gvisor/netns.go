//go:build linux

package gvisor

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Plain network namespace (no NetSlot given): loopback plus a veth pair whose
// two ends both live inside the namespace. runsc (--network=sandbox) takes
// over the end that has an address at start/restore time (vg, guestIP) and
// removes the address from the host kernel; right after, the other end (vh)
// gets hostIP so that a socket opened inside the namespace (Dial) reaches
// the sandbox's netstack. Every sandbox uses the same addresses: they are
// isolated by the namespace.
const (
	netnsDir     = "/run/netns"
	netnsPrefix  = "cubegv-"
	plainGuestIP = "10.11.0.2"
	plainHostIP  = "10.11.0.1"
	plainPrefix  = 30
	vethGuest    = "vg0"
	vethHost     = "vh0"
)

// createPlainNetns creates /run/netns/<name> with lo up and the veth pair.
func createPlainNetns(name string) (path string, err error) {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return "", err
	}
	path = filepath.Join(netnsDir, name)
	ch := make(chan error, 1)
	go func() {
		// A throw-away locked thread: it switches to the new namespace and
		// is left to die locked (never reused by the Go scheduler).
		goruntime.LockOSThread()
		ns, err := netns.NewNamed(name)
		if err != nil {
			ch <- fmt.Errorf("new netns %s: %w", name, err)
			return
		}
		ns.Close()
		ch <- nil
	}()
	if err := <-ch; err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			deleteNetns(name)
		}
	}()
	h, err := netnsHandle(path)
	if err != nil {
		return "", err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return "", fmt.Errorf("netns %s: lo: %w", name, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return "", fmt.Errorf("netns %s: lo up: %w", name, err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: vethGuest}, PeerName: vethHost}
	if err := h.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("netns %s: veth: %w", name, err)
	}
	vg, err := h.LinkByName(vethGuest)
	if err != nil {
		return "", err
	}
	vh, err := h.LinkByName(vethHost)
	if err != nil {
		return "", err
	}
	addr, _ := netlink.ParseAddr(fmt.Sprintf("%s/%d", plainGuestIP, plainPrefix))
	if err := h.AddrAdd(vg, addr); err != nil {
		return "", fmt.Errorf("netns %s: addr: %w", name, err)
	}
	for _, l := range []netlink.Link{vg, vh} {
		if err := h.LinkSetUp(l); err != nil {
			return "", fmt.Errorf("netns %s: link up: %w", name, err)
		}
	}
	return path, nil
}

// plainNetnsStarted gives the kernel end of the pair its address once runsc
// has taken the guest end.
func plainNetnsStarted(path string) error {
	h, err := netnsHandle(path)
	if err != nil {
		return err
	}
	defer h.Close()
	vh, err := h.LinkByName(vethHost)
	if err != nil {
		return err
	}
	addr, _ := netlink.ParseAddr(fmt.Sprintf("%s/%d", plainHostIP, plainPrefix))
	if err := h.AddrReplace(vh, addr); err != nil {
		return fmt.Errorf("netns %s: host addr: %w", path, err)
	}
	return nil
}

func netnsHandle(path string) (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", path, err)
	}
	return h, nil
}

// deleteNetns unmounts and removes /run/netns/<name>; a missing one is fine.
func deleteNetns(name string) error {
	path := filepath.Join(netnsDir, name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// listOwnNetns returns the names of namespaces this runtime created.
func listOwnNetns() []string {
	ents, _ := os.ReadDir(netnsDir)
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), netnsPrefix) {
			out = append(out, e.Name())
		}
	}
	return out
}

// dialInNetns opens a TCP connection from inside the network namespace at
// nsPath. The socket is created on a locked OS thread switched into the
// namespace; once connected it works from any thread.
func dialInNetns(ctx context.Context, nsPath, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		goruntime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			goruntime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(nsPath)
		if err != nil {
			goruntime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("open netns %s: %w", nsPath, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			goruntime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("setns %s: %w", nsPath, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err := netns.Set(orig); err != nil {
			// The thread is in the wrong namespace: keep it locked so
			// that it exits with the goroutine.
			ch <- result{c, nil}
			return
		}
		goruntime.UnlockOSThread()
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}
