//go:build linux

package network

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"golang.org/x/net/dns/dnsmessage"
)

// dnsForwarder answers the guest's DNS queries on GatewayIP:53 (UDP) in
// the slot's router namespace, forwards them to the upstream resolver from
// the host namespace, and adds the A records of answers for allowed
// domains to the slot's "dns" nftables set before the guest sees them.
// With the internet denied, queries for names outside the allow-list are
// refused (no DNS tunnelling through a deny-all policy).
type dnsForwarder struct {
	s        *slot
	conn     *net.UDPConn
	tcp      net.Listener
	upstream string
	log      *slog.Logger
	sem      chan struct{}

	mu      sync.Mutex
	domains []string
	denyAll bool
	learned map[netip.Addr]learned
}

type learned struct {
	name string
	exp  time.Time
}

// defaultUpstream is the first nameserver of /etc/resolv.conf.
func defaultUpstream() string {
	b, err := os.ReadFile("/etc/resolv.conf")
	if err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && f[0] == "nameserver" {
				if a, err := netip.ParseAddr(f[1]); err == nil {
					return netip.AddrPortFrom(a, 53).String()
				}
			}
		}
	}
	return "127.0.0.1:53"
}

func startDNS(s *slot, upstream string, log *slog.Logger) (*dnsForwarder, error) {
	d := &dnsForwarder{s: s, upstream: upstream, log: log, sem: make(chan struct{}, 64), learned: map[netip.Addr]learned{}}
	d.setPolicy(s.comp)
	err := inNS(s.ns, func() error {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: GatewayIP.AsSlice(), Port: 53})
		if err != nil {
			return err
		}
		d.conn = c
		l, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: GatewayIP.AsSlice(), Port: 53})
		if err != nil {
			c.Close()
			return err
		}
		d.tcp = l
		return nil
	})
	if err != nil {
		return nil, err
	}
	go d.serve()
	go d.serveTCP()
	return d, nil
}

func (d *dnsForwarder) close() {
	d.conn.Close()
	d.tcp.Close()
}

// serveTCP serves DNS over TCP (RFC 7766 framing), one query at a time per
// connection, forwarded over TCP.
func (d *dnsForwarder) serveTCP() {
	for {
		c, err := d.tcp.Accept()
		if err != nil {
			return
		}
		select {
		case d.sem <- struct{}{}:
		default:
			c.Close()
			continue
		}
		go func() {
			defer func() { <-d.sem }()
			defer c.Close()
			for {
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				q, err := readTCPMsg(c)
				if err != nil {
					return
				}
				resp := d.handle(q, true)
				if resp == nil {
					return
				}
				if err := writeTCPMsg(c, resp); err != nil {
					return
				}
			}
		}()
	}
}

func readTCPMsg(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	b := make([]byte, binary.BigEndian.Uint16(l[:]))
	_, err := io.ReadFull(r, b)
	return b, err
}

func writeTCPMsg(w io.Writer, m []byte) error {
	b := make([]byte, 2+len(m))
	binary.BigEndian.PutUint16(b, uint16(len(m)))
	copy(b[2:], m)
	_, err := w.Write(b)
	return err
}

// setPolicy installs new patterns (no kernel change: at start).
func (d *dnsForwarder) setPolicy(c compiled) {
	d.mu.Lock()
	d.domains, d.denyAll = c.domains, c.denyAll
	d.mu.Unlock()
}

// update runs apply (the nftables transaction that replaces the policy and
// refills the DNS set with keep, the learned addresses still allowed) and
// then installs the new patterns, all under the forwarder's lock, so an
// answer being snooped concurrently is judged entirely by the old or
// entirely by the new policy.
func (d *dnsForwarder) update(c compiled, apply func(keep []nftables.SetElement) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var keep []nftables.SetElement
	now := time.Now()
	still := map[netip.Addr]learned{}
	for a, l := range d.learned {
		if l.exp.After(now) && matchDomain(c.domains, l.name) {
			still[a] = l
			keep = append(keep, nftables.SetElement{Key: ip4(a), Timeout: l.exp.Sub(now).Round(time.Second) + time.Second})
		}
	}
	if err := apply(keep); err != nil {
		return err
	}
	d.learned = still
	d.domains, d.denyAll = c.domains, c.denyAll
	return nil
}

func (d *dnsForwarder) reset() {
	d.mu.Lock()
	d.learned = map[netip.Addr]learned{}
	d.mu.Unlock()
}

func (d *dnsForwarder) serve() {
	buf := make([]byte, 4096)
	for {
		n, from, err := d.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return // closed
		}
		q := append([]byte(nil), buf[:n]...)
		select {
		case d.sem <- struct{}{}:
		default:
			continue // too many in flight: drop, the guest retries
		}
		go func() {
			defer func() { <-d.sem }()
			if resp := d.handle(q, false); resp != nil {
				_, _ = d.conn.WriteToUDPAddrPort(resp, from)
			}
		}()
	}
}

// handle returns the response to send to the guest (nil = none).
func (d *dnsForwarder) handle(q []byte, tcp bool) []byte {
	hdr, qs, name, resp := parseQuery(q)
	if resp != nil || name == "" {
		return resp
	}
	d.mu.Lock()
	allowed := matchDomain(d.domains, name)
	denyAll := d.denyAll
	d.mu.Unlock()
	if denyAll && !allowed {
		return refuse(hdr, qs, dnsmessage.RCodeRefused)
	}
	resp, err := d.exchange(q, tcp)
	if err != nil {
		return refuse(hdr, qs, dnsmessage.RCodeServerFailure)
	}
	if allowed {
		addrs, ttl := answerA(resp)
		if len(addrs) > 0 {
			d.mu.Lock()
			defer d.mu.Unlock()
			if !matchDomain(d.domains, name) {
				// The policy changed while the query was upstream.
				return refuse(hdr, qs, dnsmessage.RCodeRefused)
			}
			c, err := d.s.nft()
			if err == nil {
				err = addDNSAddrs(c, addrs, ttl)
			}
			if err != nil {
				d.log.Warn("network: dns set", "slot", d.s.id, "err", err)
				return refuse(hdr, qs, dnsmessage.RCodeServerFailure)
			}
			for _, a := range addrs {
				d.learned[a] = learned{name: name, exp: time.Now().Add(ttl)}
			}
		}
	}
	return resp
}

// parseQuery parses a guest's query. It returns the query name, or a
// response to send at once (FORMERR), or neither (drop).
func parseQuery(q []byte) (dnsmessage.Header, []dnsmessage.Question, string, []byte) {
	var p dnsmessage.Parser
	hdr, err := p.Start(q)
	if err != nil || hdr.Response {
		return hdr, nil, "", nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return hdr, nil, "", refuse(hdr, nil, dnsmessage.RCodeFormatError)
	}
	name := strings.TrimSuffix(strings.ToLower(qs[0].Name.String()), ".")
	if name == "" {
		return hdr, qs, "", refuse(hdr, qs, dnsmessage.RCodeRefused)
	}
	return hdr, qs, name, nil
}

func (d *dnsForwarder) exchange(q []byte, tcp bool) ([]byte, error) {
	network := "udp"
	if tcp {
		network = "tcp"
	}
	c, err := net.DialTimeout(network, d.upstream, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if tcp {
		if err := writeTCPMsg(c, q); err != nil {
			return nil, err
		}
		return readTCPMsg(c)
	}
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

// answerA returns the IPv4 answers of a response and the TTL to keep them
// (clamped to [dnsMinTTL, dnsMaxTTL]).
func answerA(resp []byte) ([]netip.Addr, time.Duration) {
	var p dnsmessage.Parser
	if _, err := p.Start(resp); err != nil {
		return nil, 0
	}
	if err := p.SkipAllQuestions(); err != nil {
		return nil, 0
	}
	var out []netip.Addr
	ttl := dnsMaxTTL
	for {
		h, err := p.AnswerHeader()
		if err != nil {
			break
		}
		if h.Type == dnsmessage.TypeA && h.Class == dnsmessage.ClassINET {
			r, err := p.AResource()
			if err != nil {
				break
			}
			out = append(out, netip.AddrFrom4(r.A))
			if t := time.Duration(h.TTL) * time.Second; t < ttl {
				ttl = t
			}
			continue
		}
		if err := p.SkipAnswer(); err != nil {
			break
		}
	}
	return out, max(ttl, dnsMinTTL)
}

func refuse(hdr dnsmessage.Header, qs []dnsmessage.Question, rc dnsmessage.RCode) []byte {
	h := dnsmessage.Header{ID: hdr.ID, Response: true, OpCode: hdr.OpCode, RecursionDesired: hdr.RecursionDesired,
		RecursionAvailable: true, RCode: rc}
	b := dnsmessage.NewBuilder(nil, h)
	_ = b.StartQuestions()
	for _, q := range qs {
		_ = b.Question(q)
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}
