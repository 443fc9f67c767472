//go:build linux

package net_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	stdnet "net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	virtionet "github.com/cubesandbox/cube/internal/vmm/devices/virtio/net"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

var (
	guestMAC = stdnet.HardwareAddr{0x52, 0x54, 0x00, 0xc0, 0xbe, 0x01}
	guestIP  = stdnet.IPv4(10, 77, 0, 2).To4()
	hostIP   = stdnet.IPv4(10, 77, 0, 1).To4()
)

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// tapInNetns creates a tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) the way the
// node does, moves it into a fresh network namespace with address
// 10.77.0.1/24 and returns its fd. Everything is removed on cleanup.
func tapInNetns(t *testing.T) *os.File {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for netns and tap; the device logic is covered by the fuzz and unit tests")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2")
	}
	name := fmt.Sprintf("cvt%d", os.Getpid()%100000)
	ns := "cube-virtio-" + name
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	var ifr [40]byte
	copy(ifr[:], name)
	binary.LittleEndian.PutUint16(ifr[16:], unix.IFF_TAP|unix.IFF_NO_PI|unix.IFF_VNET_HDR)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&ifr[0]))); errno != 0 {
		unix.Close(fd)
		t.Fatalf("TUNSETIFF: %v", errno)
	}
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run(t, "ip", "link", "set", name, "netns", ns)
	run(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
	run(t, "ip", "-n", ns, "addr", "add", "10.77.0.1/24", "dev", name)
	run(t, "ip", "-n", ns, "link", "set", name, "up")
	f, err := virtionet.OpenTapFD(fd)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func arpRequest() []byte {
	f := make([]byte, 42)
	copy(f[0:], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:], guestMAC)
	binary.BigEndian.PutUint16(f[12:], 0x0806)
	binary.BigEndian.PutUint16(f[14:], 1)      // ethernet
	binary.BigEndian.PutUint16(f[16:], 0x0800) // ipv4
	f[18], f[19] = 6, 4
	binary.BigEndian.PutUint16(f[20:], 1) // request
	copy(f[22:], guestMAC)
	copy(f[28:], guestIP)
	copy(f[38:], hostIP)
	return f
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

func icmpEcho(dstMAC stdnet.HardwareAddr, payload []byte) []byte {
	ip := make([]byte, 20+8+len(payload))
	ip[0], ip[8], ip[9] = 0x45, 64, 1
	binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
	copy(ip[12:], guestIP)
	copy(ip[16:], hostIP)
	binary.BigEndian.PutUint16(ip[10:], csum(ip[:20]))
	ic := ip[20:]
	ic[0] = 8 // echo request
	binary.BigEndian.PutUint16(ic[4:], 0x4242)
	binary.BigEndian.PutUint16(ic[6:], 1)
	copy(ic[8:], payload)
	binary.BigEndian.PutUint16(ic[2:], csum(ic))
	f := append(append(append([]byte{}, dstMAC...), guestMAC...), 0x08, 0x00)
	return append(f, ip...)
}

func TestFramesBothWaysOverRealTap(t *testing.T) {
	pingOverTap(t, virtionet.FMAC, virtionet.HdrSize+1526)
}

// With mergeable rx buffers of 64 bytes, the echo reply (94 bytes with
// its header) spans two buffers.
func TestMergeableRxBuffers(t *testing.T) {
	pingOverTap(t, virtionet.FMAC|virtionet.FMrgRxBuf, 64)
}

func pingOverTap(t *testing.T, features uint64, bufSize int) {
	tap := tapInNetns(t)
	dev, err := virtionet.New(virtionet.Config{Tap: tap, MAC: guestMAC})
	if err != nil {
		tap.Close()
		t.Fatal(err)
	}
	defer dev.Close()
	var tr *virtio.Transport
	d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		tr = virtio.NewTransport(dev, mem, irq, virtio.Options{})
		return tr
	})
	defer tr.Reset()
	if mac := d.ReadConfig(0, 6); !bytes.Equal(mac, guestMAC) {
		t.Fatalf("config MAC %x", mac)
	}
	if err := d.Init(features, 2, 64); err != nil {
		t.Fatal(err)
	}
	rx, tx := d.Queues[0], d.Queues[1]
	for i := 0; i < 48; i++ {
		rx.Add(vt.W(bufSize))
	}
	rx.Kick()
	hdr := make([]byte, virtionet.HdrSize)

	// recv waits for a frame matching f, re-posting buffers and joining
	// mergeable buffers by their header's num_buffers.
	var pending []byte
	left := 0
	recv := func(what string, f func([]byte) bool) []byte {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			for _, u := range rx.Collect() {
				rx.Add(vt.W(bufSize))
				rx.Kick()
				b := u.Data()
				if left == 0 {
					if len(b) < virtionet.HdrSize {
						t.Fatalf("rx buffer of %d bytes", len(b))
					}
					left = 1
					if features&virtionet.FMrgRxBuf != 0 {
						left = int(binary.LittleEndian.Uint16(b[10:]))
					}
					pending = append([]byte(nil), b[virtionet.HdrSize:]...)
				} else {
					pending = append(pending, b...)
				}
				left--
				if left == 0 && f(pending) {
					return pending
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
		t.Fatalf("no %s frame within 10s (rx %d dropped %d)", what, dev.RxFrames.Load(), dev.RxDropped.Load())
		return nil
	}

	// Guest -> host ARP request; host -> guest ARP reply.
	if _, err := tx.Do(vt.R(hdr), vt.R(arpRequest())); err != nil {
		t.Fatal(err)
	}
	reply := recv("ARP reply", func(f []byte) bool {
		return len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == 0x0806 && binary.BigEndian.Uint16(f[20:]) == 2 &&
			bytes.Equal(f[28:32], hostIP)
	})
	if !bytes.Equal(reply[0:6], guestMAC) || !bytes.Equal(reply[32:38], guestMAC) {
		t.Errorf("ARP reply not addressed to the guest: %x", reply[:42])
	}
	hostMAC := stdnet.HardwareAddr(append([]byte{}, reply[22:28]...))

	// Guest pings the host namespace; the echo reply comes back (the
	// header and frame in separate descriptors, like Linux sends them).
	payload := []byte("cube virtio-net ping payload")
	if _, err := tx.Do(vt.R(hdr), vt.R(icmpEcho(hostMAC, payload))); err != nil {
		t.Fatal(err)
	}
	echo := recv("ICMP echo reply", func(f []byte) bool {
		return len(f) >= 42 && binary.BigEndian.Uint16(f[12:]) == 0x0800 && f[23] == 1 && f[34] == 0
	})
	if !bytes.Equal(echo[26:30], hostIP) || !bytes.Equal(echo[30:34], guestIP) || !bytes.Contains(echo, payload) {
		t.Errorf("bad echo reply %x", echo)
	}
	if dev.TxFrames.Load() != 2 || dev.TxDropped.Load() != 0 {
		t.Errorf("tx frames %d dropped %d", dev.TxFrames.Load(), dev.TxDropped.Load())
	}
	// A runt frame is dropped, not sent; the device keeps working.
	if _, err := tx.Do(vt.R([]byte{1, 2, 3})); err != nil {
		t.Fatal(err)
	}
	if dev.TxDropped.Load() != 1 {
		t.Errorf("runt frame not dropped")
	}
	// Reset stops the reader; re-initialising works.
	d.SetStatus(0)
	if err := d.Init(features|virtionet.FGuestCsum, 2, 64); err != nil {
		t.Fatal(err)
	}
}
