//go:build linux

package network

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
)

func TestPolicyAllowDeny(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	get := func(a netip.Addr) bool { _, err := httpGet(ns, env.url(a)); return err == nil }
	set := func(p Policy) {
		t.Helper()
		if err := env.nsMgr.SetPolicy(s.ID, p); err != nil {
			t.Fatal(err)
		}
	}
	if !get(env.inetA) || !get(env.inetB) {
		t.Fatal("default policy: no internet")
	}
	set(Policy{AllowInternetAccess: Bool(false)})
	if get(env.inetA) {
		t.Error("allow_internet_access=false: reached the internet")
	}
	set(Policy{DenyOut: []string{env.inetA.String() + "/32"}})
	if get(env.inetA) || !get(env.inetB) {
		t.Error("denyOut of one address: wrong result")
	}
	// allow wins over deny.
	set(Policy{AllowOut: []string{env.inetA.String()}, DenyOut: []string{"0.0.0.0/0"}})
	if !get(env.inetA) || get(env.inetB) {
		t.Error("allowOut inetA + denyOut all: wrong result")
	}
	set(Policy{AllowOut: []string{netip.PrefixFrom(env.inetA, 24).Masked().String()}, AllowInternetAccess: Bool(false)})
	if !get(env.inetA) || !get(env.inetB) {
		t.Error("allowOut /24 with internet off: wrong result")
	}
	// allowOut cannot open the always-denied ranges.
	set(Policy{AllowOut: []string{"169.254.0.0/16", "0.0.0.0/0"}})
	mustFailDial(t, ns, "169.254.169.254:80", "metadata with allowOut 169.254/16")
	mustFailDial(t, ns, net.JoinHostPort(s.HostIP, fmt.Sprint(env.hostListen.Addr().(*net.TCPAddr).Port)), "host side with allowOut 0/0")
	set(Policy{})
	if !get(env.inetA) {
		t.Error("back to default: no internet")
	}
}

func TestPolicyDomains(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	get := func(a netip.Addr) bool { _, err := httpGet(ns, env.url(a)); return err == nil }
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false), AllowOut: []string{"*.allowed.test"}}); err != nil {
		t.Fatal(err)
	}
	if get(env.inetB) {
		t.Fatal("reached inetB before resolving it")
	}
	addrs, rc, err := resolveIn(ns, "www.allowed.test")
	if err != nil || rc != dnsmessage.RCodeSuccess || len(addrs) != 1 || addrs[0] != env.inetB {
		t.Fatalf("resolve www.allowed.test: %v %v %v", addrs, rc, err)
	}
	if !get(env.inetB) {
		t.Error("resolved allowed domain not reachable")
	}
	if get(env.inetA) {
		t.Error("unresolved address reachable")
	}
	for _, name := range []string{"evil.test", "allowed.test", "www.allowed.test.evil.test"} {
		if _, rc, err := resolveIn(ns, name); err != nil || rc != dnsmessage.RCodeRefused {
			t.Errorf("%s: rcode %v err %v, want REFUSED", name, rc, err)
		}
	}
	// DNS over TCP is served and snooped the same way.
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false), AllowOut: []string{"allowed.test"}}); err != nil {
		t.Fatal(err)
	}
	if get(env.inetB) {
		t.Fatal("address of a removed domain still reachable")
	}
	if addrs, rc, err := resolveVia(ns, "allowed.test", true); err != nil || rc != dnsmessage.RCodeSuccess || len(addrs) != 1 || addrs[0] != env.inetB {
		t.Fatalf("resolve allowed.test over TCP: %v %v %v", addrs, rc, err)
	}
	if !get(env.inetB) {
		t.Error("domain resolved over TCP not reachable")
	}
	if _, rc, err := resolveVia(ns, "evil.test", true); err != nil || rc != dnsmessage.RCodeRefused {
		t.Errorf("evil.test over TCP: rcode %v err %v", rc, err)
	}
	// Dropping the domain removes the learned address at once.
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false), AllowOut: []string{"other.test"}}); err != nil {
		t.Fatal(err)
	}
	if get(env.inetB) {
		t.Error("address learned for a removed domain still reachable")
	}
	// Keeping it keeps the address.
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false), AllowOut: []string{"*.allowed.test"}}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := resolveIn(ns, "www.allowed.test"); err != nil {
		t.Fatal(err)
	}
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false), AllowOut: []string{"*.allowed.test", "x.test"}}); err != nil {
		t.Fatal(err)
	}
	if !get(env.inetB) {
		t.Error("address of a kept domain lost on update")
	}
	// DNS answers do not open private ranges (no rebinding into a LAN);
	// an allowOut CIDR does.
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowOut: []string{"*.allowed.test"}}); err != nil {
		t.Fatal(err)
	}
	if addrs, _, err := resolveIn(ns, "lan.allowed.test"); err != nil || len(addrs) != 1 || addrs[0] != env.inetPriv {
		t.Fatalf("resolve lan.allowed.test: %v %v", addrs, err)
	}
	if get(env.inetPriv) {
		t.Error("private address reachable through a DNS answer")
	}
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowOut: []string{"*.allowed.test", env.inetPriv.String()}}); err != nil {
		t.Fatal(err)
	}
	if !get(env.inetPriv) {
		t.Error("private address not reachable with an explicit allowOut")
	}
	// With the internet on, every name resolves.
	if err := env.nsMgr.SetPolicy(s.ID, Policy{}); err != nil {
		t.Fatal(err)
	}
	if addrs, rc, err := resolveIn(ns, "anything.test"); err != nil || rc != dnsmessage.RCodeSuccess || len(addrs) != 1 {
		t.Errorf("default policy resolve: %v %v %v", addrs, rc, err)
	}
}

func TestPolicyUpdateFlipsLiveConnection(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	c, err := dialFrom(ns, "tcp4", netip.AddrPortFrom(env.inetA, 7).String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func(msg string, wait time.Duration) error {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(wait))
		buf := make([]byte, len(msg))
		n := 0
		for n < len(msg) {
			k, err := c.Read(buf[n:])
			if err != nil {
				return err
			}
			n += k
		}
		if string(buf) != msg {
			return fmt.Errorf("echo %q", buf)
		}
		return nil
	}
	if err := echo("a", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false)}); err != nil {
		t.Fatal(err)
	}
	if err := echo("b", 1500*time.Millisecond); err == nil {
		t.Fatal("live connection still works after internet was turned off")
	}
	if err := env.nsMgr.SetPolicy(s.ID, Policy{}); err != nil {
		t.Fatal(err)
	}
	// "b" is retransmitted by TCP once the policy allows it again.
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1)
	if _, err := c.Read(buf); err != nil || buf[0] != 'b' {
		t.Fatalf("after re-allowing: %q %v", buf, err)
	}
	if err := echo("c", 2*time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestPolicyBadInputChangesNothing(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	bad := []Policy{
		{AllowOut: []string{"10.0.0.0/33"}},
		{AllowOut: []string{"1.2.3.999"}},
		{DenyOut: []string{"1.2.3.4/"}},
		{DenyOut: []string{"example.com"}},
		{AllowOut: []string{"*."}},
		{AllowOut: []string{"-bad.com"}},
		{AllowOut: []string{""}},
		{AllowOut: []string{"a b"}},
		{DenyOut: []string{"::ffff:1.2.3.4/128"}},
		{AllowOut: make([]string, MaxPolicyEntries+1)},
	}
	for i, p := range bad {
		err := env.nsMgr.SetPolicy(s.ID, p)
		if !errs.Is(err, errs.InvalidArgument) {
			t.Errorf("bad policy %d: err %v, want invalid_argument", i, err)
		} else if i == 0 && errs.Message(err) != `network.allowOut[0] "10.0.0.0/33": not a valid CIDR` {
			t.Errorf("message %q", errs.Message(err))
		}
	}
	if _, err := httpGet(ns, env.url(env.inetA)); err != nil {
		t.Fatalf("bad input changed the policy: %v", err)
	}
}

// big10k returns 10,000 distinct /32s in 203.0.0.0/8 (never contacted).
func big10k(extra string) []string {
	out := make([]string, 0, MaxPolicyEntries)
	for i := 0; len(out) < MaxPolicyEntries-1; i++ {
		out = append(out, fmt.Sprintf("203.%d.%d.%d", i/65536%256, i/256%256, i%256*7%256))
	}
	return append(out, extra)
}

func TestPolicy10kEntries(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	start := time.Now()
	if err := env.nsMgr.SetPolicy(s.ID, Policy{DenyOut: big10k(env.inetA.String() + "/32")}); err != nil {
		t.Fatal(err)
	}
	t.Logf("10,000-entry denyOut applied in %v", time.Since(start))
	if _, err := httpGet(ns, env.url(env.inetA)); err == nil {
		t.Error("last of 10,000 deny entries not enforced")
	}
	if _, err := httpGet(ns, env.url(env.inetB)); err != nil {
		t.Errorf("not denied address blocked: %v", err)
	}
	start = time.Now()
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false), AllowOut: big10k(env.inetB.String())}); err != nil {
		t.Fatal(err)
	}
	t.Logf("10,000-entry allowOut applied in %v", time.Since(start))
	if _, err := httpGet(ns, env.url(env.inetB)); err != nil {
		t.Errorf("last of 10,000 allow entries not enforced: %v", err)
	}
}

func TestPolicyUpdateRacesRelease(t *testing.T) {
	for i := 0; i < 10; i++ {
		s, err := env.nsMgr.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errc := make(chan error, 100)
		for g := 0; g < 3; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for k := 0; ; k++ {
					err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(k%2 == 0), AllowOut: []string{"*.allowed.test"}})
					if errs.Is(err, errs.NotFound) {
						return
					}
					if err != nil {
						errc <- err
						return
					}
				}
			}(g)
		}
		time.Sleep(time.Duration(i) * 3 * time.Millisecond)
		if err := env.nsMgr.Release(context.Background(), s.ID); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Errorf("SetPolicy racing Release: %v", err)
		}
	}
	// Slots handed out after the race have the default policy.
	s := acquire(t, env.nsMgr)
	if _, err := httpGet(guestNS(t, s), env.url(env.inetA)); err != nil {
		t.Errorf("reused slot lost default policy: %v", err)
	}
	if p, err := env.nsMgr.Policy(s.ID); err != nil || p.AllowInternetAccess != nil || len(p.AllowOut) != 0 {
		t.Errorf("reused slot policy %+v %v", p, err)
	}
}

// TestReleaseWipesConntrack: the wipe Release runs empties the slot's
// conntrack table and the host's entries of the slot; a released slot is
// gone for SetPolicy and Dial at once.
func TestReleaseWipesConntrack(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	c, err := dialFrom(ns, "tcp4", netip.AddrPortFrom(env.inetA, 7).String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sl, err := env.nsMgr.get(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	count := func() (slot, host int) {
		h, err := netlink.NewHandleAt(sl.ns, unix.NETLINK_NETFILTER)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		fl, err := h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		hfl, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range hfl {
			if f.Forward.SrcIP.Equal(sl.routerIP.AsSlice()) {
				host++
			}
		}
		return len(fl), host
	}
	if n, h := count(); n == 0 || h == 0 {
		t.Fatalf("no conntrack entries to wipe (slot %d, host %d)", n, h)
	}
	sl.mu.Lock()
	err = env.nsMgr.wipe(sl)
	sl.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if n, h := count(); n != 0 || h != 0 {
		t.Errorf("after wipe: %d slot and %d host conntrack entries", n, h)
	}
	if err := env.nsMgr.Release(context.Background(), s.ID); err != nil {
		t.Fatal(err)
	}
	if err := env.nsMgr.SetPolicy(s.ID, Policy{}); !errs.Is(err, errs.NotFound) {
		t.Errorf("SetPolicy on a released slot: %v", err)
	}
	if _, err := env.nsMgr.Dial(context.Background(), s.ID, 7); !errs.Is(err, errs.NotFound) {
		t.Errorf("Dial on a released slot: %v", err)
	}
	if err := env.nsMgr.Release(context.Background(), s.ID); !errs.Is(err, errs.NotFound) {
		t.Errorf("double Release: %v", err)
	}
}
