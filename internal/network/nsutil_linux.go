//go:build linux

package network

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const netnsDir = "/run/netns"

var (
	homeOnce sync.Once
	homeNS   netns.NsHandle = -1
	homeErr  error
)

// home returns the namespace the process's threads live in (opened once).
func home() (netns.NsHandle, error) {
	homeOnce.Do(func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		homeNS, homeErr = netns.Get()
	})
	return homeNS, homeErr
}

// inNS runs fn on an OS thread switched into the namespace ns. fn must not
// start goroutines that expect to be in ns. Sockets and files created by fn
// stay in ns. If the thread cannot be switched back it is thrown away.
func inNS(ns netns.NsHandle, fn func() error) error {
	orig, err := home()
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return // thread state unknown: exit locked, thread discarded
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("setns back: %w", err)
			return // stay locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// newNamedNS creates a network namespace bind-mounted at /run/netns/name
// and returns an open handle to it.
func newNamedNS(name string) (netns.NsHandle, error) {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return -1, err
	}
	type res struct {
		h   netns.NsHandle
		err error
	}
	rc := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			rc <- res{-1, err}
			return
		}
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if serr := netns.Set(orig); serr != nil {
			if err == nil {
				h.Close()
			}
			rc <- res{-1, fmt.Errorf("setns back: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		rc <- res{h, err}
	}()
	r := <-rc
	return r.h, r.err
}

// deleteNamedNS unmounts and removes /run/netns/name (no error if absent).
func deleteNamedNS(name string) error {
	p := filepath.Join(netnsDir, name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// writeSysctl writes a /proc/sys value in the current thread's namespace.
func writeSysctl(path, val string) error {
	return os.WriteFile(filepath.Join("/proc/sys", path), []byte(val), 0o644)
}
