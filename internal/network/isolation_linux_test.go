//go:build linux

package network

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// serveInGuest starts an HTTP server on port inside the slot's guest
// namespace (a web server the user started in the sandbox).
func serveInGuest(t testing.TB, ns netns.NsHandle, port int, body string) {
	t.Helper()
	var l net.Listener
	if err := inNS(ns, func() error {
		var err error
		l, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
}

func mustFailDial(t *testing.T, ns netns.NsHandle, addr, what string) {
	t.Helper()
	c, err := dialFrom(ns, "tcp4", addr, 700*time.Millisecond)
	if err == nil {
		b, _ := io.ReadAll(io.LimitReader(c, 64))
		c.Close()
		t.Errorf("%s: connected to %s (read %q)", what, addr, b)
	}
}

func TestIsolation(t *testing.T) {
	a := acquire(t, env.nsMgr)
	b := acquire(t, env.nsMgr)
	nsA, nsB := guestNS(t, a), guestNS(t, b)
	serveInGuest(t, nsB, 8080, "sandbox B")

	// Positive controls: B's server works through Dial, the host service
	// answers on the host, and A has internet.
	c, err := env.nsMgr.Dial(context.Background(), b.ID, 8080)
	if err != nil {
		t.Fatalf("Dial B: %v", err)
	}
	c.Close()
	hostPort := env.hostListen.Addr().(*net.TCPAddr).Port
	if hc, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", hostPort), time.Second); err != nil {
		t.Fatalf("host service not up: %v", err)
	} else {
		hc.Close()
	}
	if _, err := httpGet(nsA, env.url(env.inetA)); err != nil {
		t.Fatalf("A has no internet: %v", err)
	}

	bRouter := netip.MustParseAddr(b.HostIP).Next().String()
	type target struct{ addr, what string }
	targets := []target{
		{net.JoinHostPort(b.HostIP, "8080"), "A -> B host-side address"},
		{net.JoinHostPort(bRouter, "8080"), "A -> B router address"},
		{net.JoinHostPort(a.HostIP, fmt.Sprint(hostPort)), "A -> own host-side address (host service)"},
		{net.JoinHostPort(env.inetHost.String(), fmt.Sprint(hostPort)), "A -> host address on another link"},
		{fmt.Sprintf("127.0.0.1:%d", hostPort), "A -> host loopback service"},
	}
	for _, r := range hostAddrs() {
		ip := netip.AddrFrom4([4]byte{byte(r.lo >> 24), byte(r.lo >> 16), byte(r.lo >> 8), byte(r.lo)})
		if !ip.IsLoopback() {
			targets = append(targets, target{netip.AddrPortFrom(ip, uint16(hostPort)).String(), "A -> host address " + ip.String()})
		}
	}
	var wg sync.WaitGroup
	for _, x := range targets {
		wg.Add(1)
		go func() { defer wg.Done(); mustFailDial(t, nsA, x.addr, x.what) }()
	}
	wg.Wait()
	before := counter(t, env.nsMgr, a.ID, "cube/egress")
	mustFailDial(t, nsA, "169.254.169.254:80", "A -> metadata")
	if after := counter(t, env.nsMgr, a.ID, "cube/egress"); after <= before {
		t.Errorf("metadata connection was not dropped by the egress policy (counter %d -> %d)", before, after)
	}

	// Nothing listens on the host for B's port and the host has no route
	// to the guest address through a slot: the host cannot reach it.
	// (No connection to GuestIP is tried from the host: it would leave
	// through the host's default route.)
	if rs, err := netlink.RouteGet(GuestIP.AsSlice()); err == nil {
		for _, r := range rs {
			if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil && env.nsMgr.isOurHostLink(l.Attrs().Name) {
				t.Errorf("host routes the guest address through slot link %s", l.Attrs().Name)
			}
		}
	}
	for _, addr := range []string{net.JoinHostPort(b.HostIP, "8080"), net.JoinHostPort(bRouter, "8080"), "127.0.0.1:8080"} {
		if hc, err := net.DialTimeout("tcp4", addr, 500*time.Millisecond); err == nil {
			hc.Close()
			t.Errorf("host reached sandbox port via %s", addr)
		}
	}
	_ = nsB
}

func counter(t testing.TB, m *Manager, id, chain string) uint64 {
	t.Helper()
	c, err := m.DropCounters(id)
	if err != nil {
		t.Fatal(err)
	}
	return c[chain]
}

func TestDialReachesGuestServer(t *testing.T) {
	s := acquire(t, env.nsMgr)
	serveInGuest(t, guestNS(t, s), 3000, "hello from sandbox")
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return env.nsMgr.Dial(ctx, s.ID, 3000)
	}}
	defer tr.CloseIdleConnections()
	r, err := (&http.Client{Transport: tr, Timeout: 3 * time.Second}).Get("http://sandbox/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if string(b) != "hello from sandbox" {
		t.Fatalf("got %q", b)
	}
	if _, err := env.nsMgr.Dial(context.Background(), s.ID, 0); err == nil {
		t.Error("port 0 accepted")
	}
	if _, err := env.nsMgr.Dial(context.Background(), "nope", 3000); err == nil {
		t.Error("unknown slot accepted")
	}
	// A closed port fails fast (RST from the guest).
	if c, err := env.nsMgr.Dial(context.Background(), s.ID, 3001); err == nil {
		c.Close()
		t.Error("closed port connected")
	}
	_ = strings.TrimSpace
}
