//go:build linux

package network

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Minimal Ethernet / ARP / IPv4 / ICMP / UDP frame builders for the tests
// that play the guest at layer 2 (tap fd or AF_PACKET socket).

func mustMAC(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }

func ethFrame(dst, src net.HardwareAddr, typ uint16, payload []byte) []byte {
	b := make([]byte, 14, 14+len(payload))
	copy(b, dst)
	copy(b[6:], src)
	binary.BigEndian.PutUint16(b[12:], typ)
	return append(b, payload...)
}

func arpPacket(op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:], 1)      // Ethernet
	binary.BigEndian.PutUint16(b[2:], 0x0800) // IPv4
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], op)
	copy(b[8:], sha)
	copy(b[14:], ip4(spa))
	copy(b[18:], tha)
	copy(b[24:], ip4(tpa))
	return b
}

func csum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func ipv4Packet(src, dst netip.Addr, proto byte, payload []byte) []byte {
	b := make([]byte, 20, 20+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(20+len(payload)))
	binary.BigEndian.PutUint16(b[4:], 0x1234)
	b[8] = 64
	b[9] = proto
	copy(b[12:], ip4(src))
	copy(b[16:], ip4(dst))
	binary.BigEndian.PutUint16(b[10:], csum(b[:20]))
	return append(b, payload...)
}

func icmpEcho(id, seq uint16, data []byte) []byte {
	b := make([]byte, 8, 8+len(data))
	b[0] = 8
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	b = append(b, data...)
	binary.BigEndian.PutUint16(b[2:], csum(b))
	return b
}

func udpPacket(sport, dport uint16, data []byte) []byte {
	b := make([]byte, 8, 8+len(data))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(8+len(data)))
	return append(b, data...) // checksum 0: none (IPv4)
}

// guestUDP builds an Ethernet frame carrying UDP from (mac, src) to dst:9.
func guestUDP(mac net.HardwareAddr, src, dst netip.Addr, msg string) []byte {
	return ethFrame(mustMAC(GatewayMAC), mac, 0x0800, ipv4Packet(src, dst, unix.IPPROTO_UDP, udpPacket(40000, 9, []byte(msg))))
}

// readFrame reads frames from f until match accepts one or timeout passes.
func readFrame(f *os.File, timeout time.Duration, match func([]byte) bool) ([]byte, bool) {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 65536)
	for {
		_ = f.SetReadDeadline(deadline)
		n, err := f.Read(buf)
		if err != nil {
			return nil, false
		}
		if match(buf[:n]) {
			return append([]byte(nil), buf[:n]...), true
		}
	}
}

// packetSocket opens an AF_PACKET socket on ifname inside namespace ns:
// the guest writing raw frames on its eth0.
type packetSocket struct {
	fd  int
	idx int
}

func (p *packetSocket) send(frame []byte) error {
	return unix.Sendto(p.fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: p.idx, Halen: 6})
}

func (p *packetSocket) close() { unix.Close(p.fd) }

func htons(v uint16) uint16 { return v<<8 | v>>8 }
