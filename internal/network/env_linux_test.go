//go:build linux

package network

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/runtime"
)

// The test environment: two managers (netns mode and tap mode) with names
// and ranges derived from the test's pid, and an "internet" namespace of
// the test's own, reached from slots through the host's NAT. Nothing here
// sends traffic outside namespaces the test created.
type testEnv struct {
	prefix     string
	nsMgr      *Manager // ModeNetns
	tapMgr     *Manager // ModeTap
	inetNS     netns.NsHandle
	inetName   string
	inetLink   string
	inetHost   netip.Addr // host side of the internet veth
	inetA      netip.Addr // web + dns server
	inetB      netip.Addr // second address (domain tests)
	inetPriv   netip.Addr // a private address in the internet namespace (DNS rebinding test)
	udpSeen    chan string
	closers    []func()
	nsRange    netip.Prefix
	tapRange   netip.Prefix
	staleRange netip.Prefix
	limRange   netip.Prefix
	hostListen net.Listener // a "host service" on all addresses
}

var env *testEnv

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("network tests need root (namespaces, nftables): skipping")
		os.Exit(0)
	}
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	e, err := setupEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "setup:", err)
		if e != nil {
			e.teardown()
		}
		os.Exit(1)
	}
	env = e
	code := m.Run()
	e.teardown()
	if leftoverFail && code == 0 {
		code = 1
	}
	os.Exit(code)
}

const childEnv = "CUBE_NETTEST_CHILD"

func childMain() int { return 0 }

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func setupEnv() (*testEnv, error) {
	pid := os.Getpid()
	e := &testEnv{prefix: "ct" + strconv.FormatInt(int64(pid), 36), udpSeen: make(chan string, 256)}
	third := (pid % 64) * 4
	second := 200 + (pid/64)%50
	e.nsRange = netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", second, third))
	e.tapRange = netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", second, third+1))
	e.staleRange = netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", second, third+2))
	e.limRange = netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", second, third+3))
	o := pid % 250
	e.inetHost = netip.MustParseAddr(fmt.Sprintf("198.18.%d.1", o))
	e.inetA = netip.MustParseAddr(fmt.Sprintf("198.18.%d.2", o))
	e.inetB = netip.MustParseAddr(fmt.Sprintf("198.18.%d.3", o))
	e.inetPriv = netip.MustParseAddr(fmt.Sprintf("172.31.%d.2", o))
	e.inetName = e.prefix + "inet"
	e.inetLink = e.prefix + "i0"
	if err := e.setupInternet(); err != nil {
		return e, err
	}
	var err error
	log := testLogger()
	up := netip.AddrPortFrom(e.inetA, 53).String()
	e.nsMgr, err = NewManagerWith(Options{Prefix: e.prefix + "n", HostRange: e.nsRange, PoolSize: 2, Mode: ModeNetns, ConnRate: 50, DNSUpstream: up}, log)
	if err != nil {
		return e, err
	}
	e.tapMgr, err = NewManagerWith(Options{Prefix: e.prefix + "t", HostRange: e.tapRange, PoolSize: 1, Mode: ModeTap, ConnRate: 50, DNSUpstream: up}, log)
	if err != nil {
		return e, err
	}
	e.hostListen, err = net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		return e, err
	}
	go func() {
		for {
			c, err := e.hostListen.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("host secret\n"))
			c.Close()
		}
	}()
	return e, nil
}

func (e *testEnv) teardown() {
	if e.hostListen != nil {
		e.hostListen.Close()
	}
	for _, m := range []*Manager{e.nsMgr, e.tapMgr} {
		if m != nil {
			if err := m.Purge(); err != nil {
				fmt.Fprintln(os.Stderr, "purge:", err)
			}
		}
	}
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
	if l, err := netlink.LinkByName(e.inetLink); err == nil {
		_ = netlink.LinkDel(l)
	}
	if e.inetNS > 0 {
		e.inetNS.Close()
	}
	_ = deleteNamedNS(e.inetName)
	if left := leftovers(e.prefix); len(left) > 0 {
		fmt.Fprintln(os.Stderr, "test left behind:", left)
		leftoverFail = true
	}
}

var leftoverFail bool

// setupInternet builds the test internet: namespace <prefix>inet with
// eth0 = inetA, inetB; host side inetHost/24. It serves HTTP on :80, a TCP
// echo on :7, a UDP sink on :9 and DNS on :53.
func (e *testEnv) setupInternet() error {
	var err error
	if e.inetNS, err = newNamedNS(e.inetName); err != nil {
		return err
	}
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: e.inetLink}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(e.inetNS))}); err != nil {
		return err
	}
	hl, err := netlink.LinkByName(e.inetLink)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(hl, &netlink.Addr{IPNet: ipnet(e.inetHost, 24)}); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(hl); err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(e.inetNS)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := linkUp(h, "lo"); err != nil {
		return err
	}
	eth, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	for _, a := range []netip.Addr{e.inetA, e.inetB} {
		if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipnet(a, 24)}); err != nil {
			return err
		}
	}
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipnet(e.inetPriv, 32)}); err != nil {
		return err
	}
	if err := h.LinkSetUp(eth); err != nil {
		return err
	}
	// Host route to the private address, through the test's own link only.
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: hl.Attrs().Index, Dst: ipnet(e.inetPriv, 32), Gw: e.inetA.AsSlice()}); err != nil {
		return err
	}
	return inNS(e.inetNS, func() error {
		web, err := net.Listen("tcp4", ":80")
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "internet %s", r.Host)
		})}
		go func() { _ = srv.Serve(web) }()
		e.closers = append(e.closers, func() { srv.Close() })
		echo, err := net.Listen("tcp4", ":7")
		if err != nil {
			return err
		}
		e.closers = append(e.closers, func() { echo.Close() })
		go func() {
			for {
				c, err := echo.Accept()
				if err != nil {
					return
				}
				go func() { _, _ = io.Copy(c, c); c.Close() }()
			}
		}()
		sink, err := net.ListenUDP("udp4", &net.UDPAddr{Port: 9})
		if err != nil {
			return err
		}
		e.closers = append(e.closers, func() { sink.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, _, err := sink.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				select {
				case e.udpSeen <- string(buf[:n]):
				default:
				}
			}
		}()
		dns, err := net.ListenUDP("udp4", &net.UDPAddr{IP: e.inetA.AsSlice(), Port: 53})
		if err != nil {
			return err
		}
		e.closers = append(e.closers, func() { dns.Close() })
		go e.serveDNS(dns)
		dnsT, err := net.Listen("tcp4", netip.AddrPortFrom(e.inetA, 53).String())
		if err != nil {
			return err
		}
		e.closers = append(e.closers, func() { dnsT.Close() })
		go e.serveDNSTCP(dnsT)
		return nil
	})
}

// dnsAnswer: www.allowed.test and allowed.test -> inetB, lan.allowed.test
// -> inetPriv, anything else -> inetA.
func (e *testEnv) dnsAnswer(q []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	qq, err := p.Question()
	if err != nil {
		return nil
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true})
	_ = b.StartQuestions()
	_ = b.Question(qq)
	_ = b.StartAnswers()
	ip := e.inetA
	switch qq.Name.String() {
	case "www.allowed.test.", "allowed.test.":
		ip = e.inetB
	case "lan.allowed.test.":
		ip = e.inetPriv
	}
	if qq.Type == dnsmessage.TypeA {
		_ = b.AResource(dnsmessage.ResourceHeader{Name: qq.Name, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: ip.As4()})
	}
	out, _ := b.Finish()
	return out
}

func (e *testEnv) serveDNS(c *net.UDPConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if out := e.dnsAnswer(buf[:n]); out != nil {
			_, _ = c.WriteToUDPAddrPort(out, from)
		}
	}
}

func (e *testEnv) serveDNSTCP(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			for {
				q, err := readTCPMsg(c)
				if err != nil {
					return
				}
				if err := writeTCPMsg(c, e.dnsAnswer(q)); err != nil {
					return
				}
			}
		}()
	}
}

// Guest-side helpers: sockets created inside a slot's guest namespace are
// what a process of the sandbox would use.

func guestNS(t testing.TB, s runtime.NetSlot) netns.NsHandle {
	t.Helper()
	h, err := netns.GetFromPath(s.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func dialFrom(ns netns.NsHandle, network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := inNS(ns, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: timeout}).Dial(network, addr)
		return err
	})
	return c, err
}

func httpClientIn(ns netns.NsHandle) *http.Client {
	return &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialFrom(ns, "tcp4", addr, time.Second)
		}}}
}

func httpGet(ns netns.NsHandle, url string) (string, error) {
	r, err := httpClientIn(ns).Get(url)
	if err != nil {
		return "", err
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	return string(b), err
}

// resolveIn asks the slot's DNS forwarder from inside the guest (UDP).
func resolveIn(ns netns.NsHandle, name string) ([]netip.Addr, dnsmessage.RCode, error) {
	return resolveVia(ns, name, false)
}

func resolveVia(ns netns.NsHandle, name string, tcp bool) ([]netip.Addr, dnsmessage.RCode, error) {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 77, RecursionDesired: true})
	_ = b.StartQuestions()
	_ = b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name + "."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	q, _ := b.Finish()
	network := "udp4"
	if tcp {
		network = "tcp4"
	}
	c, err := dialFrom(ns, network, netip.AddrPortFrom(GatewayIP, 53).String(), time.Second)
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	var resp []byte
	if tcp {
		if err := writeTCPMsg(c, q); err != nil {
			return nil, 0, err
		}
		if resp, err = readTCPMsg(c); err != nil {
			return nil, 0, err
		}
	} else {
		if _, err := c.Write(q); err != nil {
			return nil, 0, err
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			return nil, 0, err
		}
		resp = buf[:n]
	}
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil {
		return nil, 0, err
	}
	addrs, _ := answerA(resp)
	return addrs, h.RCode, nil
}

func (e *testEnv) url(a netip.Addr) string { return "http://" + a.String() + "/" }

var acquireMu sync.Mutex

func acquire(t testing.TB, m *Manager) runtime.NetSlot {
	t.Helper()
	s, err := m.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Release(context.Background(), s.ID) })
	return s
}

func openPacketSocket(t testing.TB, ns netns.NsHandle, ifname string) *packetSocket {
	t.Helper()
	var p packetSocket
	err := inNS(ns, func() error {
		l, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		p = packetSocket{fd: fd, idx: l.Index}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.close)
	return &p
}

// expectUDP waits for msg at the internet's UDP sink.
func (e *testEnv) expectUDP(msg string, timeout time.Duration) bool {
	deadline := time.After(timeout)
	for {
		select {
		case got := <-e.udpSeen:
			if got == msg {
				return true
			}
		case <-deadline:
			return false
		}
	}
}
