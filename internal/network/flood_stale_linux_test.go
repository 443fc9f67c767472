//go:build linux

package network

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// floodConnect opens n TCP connections at once from ns to addr:80 and
// returns how many were established within wait.
func floodConnect(t *testing.T, ns netns.NsHandle, addr [4]byte, n int, wait time.Duration) int {
	t.Helper()
	fds := make([]int, 0, n)
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	if err := inNS(ns, func() error {
		for i := 0; i < n; i++ {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
			err = unix.Connect(fd, &unix.SockaddrInet4{Port: 80, Addr: addr})
			if err != nil && err != unix.EINPROGRESS {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(wait)
	ok := 0
	for _, fd := range fds {
		pf := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if k, _ := unix.Poll(pf, 0); k == 1 {
			if e, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); e == 0 && pf[0].Revents&unix.POLLOUT != 0 {
				ok++
			}
		}
	}
	return ok
}

func TestNewConnectionFloodIsRateLimited(t *testing.T) {
	a := acquire(t, env.nsMgr)
	b := acquire(t, env.nsMgr)
	nsA, nsB := guestNS(t, a), guestNS(t, b)
	done := make(chan int)
	go func() { done <- floodConnect(t, nsA, env.inetA.As4(), 400, 800*time.Millisecond) }()
	// The neighbour is unaffected while A floods.
	time.Sleep(50 * time.Millisecond)
	for i := 0; i < 5; i++ {
		if _, err := httpGet(nsB, env.url(env.inetA)); err != nil {
			t.Errorf("neighbour request %d during flood: %v", i, err)
		}
	}
	got := <-done
	t.Logf("flood: %d of 400 connections established within 0.8 s (limit 50/s, burst 50)", got)
	if got >= 200 || got == 0 {
		t.Errorf("%d of 400 connections established: not rate limited as configured", got)
	}
	if c := counter(t, env.nsMgr, a.ID, "cube/egress"); c == 0 {
		t.Error("no drops counted by the rate limit")
	}
}

// TestStaleCleanupAndAdopt simulates a crash: a manager is abandoned with
// active and pooled slots; the next one adopts one survivor and reaps the
// rest.
func TestStaleCleanupAndAdopt(t *testing.T) {
	opts := Options{Prefix: env.prefix + "s", HostRange: env.staleRange, PoolSize: 1, Mode: ModeNetns,
		DNSUpstream: env.inetA.String() + ":53"}
	m1, err := NewManagerWith(opts, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	keep, err := m1.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	lost, err := m1.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); m1.Stats().Pool < 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("pool did not refill")
		}
	}
	if _, err := NewManagerWith(opts, testLogger()); err == nil {
		t.Fatal("second manager with the same prefix accepted")
	}
	// "Crash": stop m1's goroutines without any cleanup of slots.
	m1.crashForTest()

	m2, err := NewManagerWith(opts, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Purge()
	if o := m2.Orphans(); len(o) != 3 {
		t.Fatalf("orphans %v, want 3", o)
	}
	if err := m2.Adopt(context.Background(), keep, Policy{AllowOut: []string{env.inetA.String()}, DenyOut: []string{"0.0.0.0/0"}}); err != nil {
		t.Fatal(err)
	}
	if err := m2.Adopt(context.Background(), keep, Policy{}); err == nil {
		t.Error("adopted twice")
	}
	if n := m2.ReapStale(); n != 2 {
		t.Errorf("reaped %d, want 2", n)
	}
	for _, p := range []string{lost.NetnsPath, lost.RouterNetnsPath} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s survived", p)
		}
	}
	if _, err := netlink.LinkByName(opts.Prefix + "h" + filepath.Base(lost.ID)[len(opts.Prefix)+1:]); err == nil {
		t.Error("host link of the lost slot survived")
	}
	ns := guestNS(t, keep)
	if _, err := httpGet(ns, env.url(env.inetA)); err != nil {
		t.Errorf("adopted slot has no egress: %v", err)
	}
	if _, err := httpGet(ns, env.url(env.inetB)); err == nil {
		t.Error("adopted slot lost its policy")
	}
	// The adopted slot is a normal active slot again.
	c, err := m2.Dial(context.Background(), keep.ID, 9)
	if err == nil {
		c.Close()
	}
	if err := m2.Release(context.Background(), keep.ID); err != nil {
		t.Fatal(err)
	}
	if err := m2.Purge(); err != nil {
		t.Fatal(err)
	}
	if left := leftovers(opts.Prefix); len(left) > 0 {
		t.Errorf("left after purge: %v", left)
	}
}

// leftovers lists namespaces and links whose name starts with prefix.
func leftovers(prefix string) []string {
	var out []string
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if len(e.Name()) > len(prefix) && e.Name()[:len(prefix)] == prefix {
				out = append(out, "netns "+e.Name())
			}
		}
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			n := l.Attrs().Name
			if len(n) > len(prefix) && n[:len(prefix)] == prefix {
				out = append(out, "link "+n)
			}
		}
	}
	return out
}

// crashForTest stops the manager's goroutines and forgets everything
// without touching the kernel, as if the process had died.
func (m *Manager) crashForTest() {
	m.mu.Lock()
	m.closed = true
	all := append([]*slot(nil), m.pool...)
	for _, s := range m.active {
		all = append(all, s)
	}
	m.pool, m.active = nil, map[string]*slot{}
	m.mu.Unlock()
	close(m.done)
	m.wg.Wait()
	if m.reaper != nil {
		m.reaper.Stop()
	}
	m.releaseLock() // the process died
	for _, s := range all {
		if s.dns != nil {
			s.dns.close()
		}
		if s.ns >= 0 {
			s.ns.Close()
		}
	}
}

// TestConcurrentConnectionLimit: a slot holds at most MaxConns outbound
// connections; closing some makes room again.
func TestConcurrentConnectionLimit(t *testing.T) {
	m, err := NewManagerWith(Options{Prefix: env.prefix + "l", HostRange: env.limRange, PoolSize: 0, Mode: ModeNetns,
		MaxConns: 20, DNSUpstream: env.inetA.String() + ":53"}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Purge()
	s, err := m.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Release(context.Background(), s.ID)
	ns := guestNS(t, s)
	var conns []interface{ Close() error }
	failed := 0
	for i := 0; i < 30; i++ {
		c, err := dialFrom(ns, "tcp4", env.inetA.String()+":7", 400*time.Millisecond)
		if err != nil {
			failed++
			continue
		}
		conns = append(conns, c)
	}
	if len(conns) > 21 || failed < 9 {
		t.Fatalf("%d connections held with a limit of 20 (%d failed)", len(conns), failed)
	}
	for _, c := range conns[:10] {
		c.Close()
	}
	conns = conns[10:]
	time.Sleep(200 * time.Millisecond)
	c, err := dialFrom(ns, "tcp4", env.inetA.String()+":7", 2*time.Second)
	if err != nil {
		t.Fatalf("no room after closing connections: %v", err)
	}
	c.Close()
	for _, c := range conns {
		c.Close()
	}
}
