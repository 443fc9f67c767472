//go:build linux

// Package snaptest is the synthetic guest used by the snapshot tests and
// `cube bench restore`: a machine with a virtio-rng device whose guest
// runs at CPL 3 (native speed on KVM-PVM), writes a pattern to memory,
// completes one entropy request, posts a second one (left in flight) and
// counts until the host sets a "go" word; then it notifies the device,
// waits for the second request to complete and counts on in a second
// counter. Snapshot it while it counts in phase 1 and every clone must
// finish the in-flight request on its own device.
package snaptest

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	"github.com/cubesandbox/cube/internal/vmm/synth"
	"github.com/cubesandbox/cube/internal/vmm/vm"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// Guest-physical layout.
const (
	Counter  = synth.CounterAddr // phase 1 counter (u64)
	Go       = 0x7F100           // host writes 1 to let phase 2 start (u32)
	Phase    = 0x7F200           // guest progress: 1 counting, 2 done (u32)
	Counter2 = 0x7F300           // phase 2 counter (u64)
	Mark     = 0x7F400           // free word for isolation checks (u64)
	Desc     = 0x200000
	Avail    = 0x201000
	Used     = 0x202000
	Buf0     = 0x203000 // request 1 (completed before the snapshot)
	Buf1     = 0x203100 // request 2 (in flight at the snapshot)
	BufLen   = 64
	Pattern  = 0x300000 // PatternQwords qwords of PatternValue
	// PatternQwords spans 1 MiB.
	PatternQwords = 1 << 17
	PatternValue  = 0x5A5A_C0DE_0000_1234
	QueueSize     = 8
	MemSize       = 64 << 20
)

// Spec returns the machine spec of the synthetic guest (also used to
// restore it: the device set must match).
func Spec() machine.Spec {
	return machine.Spec{
		KernelFormat: boot.FormatRaw, MemSize: MemSize, VCPUs: 1,
		Virtio: []machine.VirtioDevice{{Name: "rng0", Build: func(mem devices.GuestMemory, irq devices.IRQLine) (devices.MMIODevice, error) {
			return virtio.NewTransport(rng.New(), mem, irq, virtio.Options{NoEventIdx: true}), nil
		}}},
	}
}

type asm []byte

func (a asm) imm32(v uint32) asm { return binary.LittleEndian.AppendUint32(a, v) }
func (a asm) imm16(v uint16) asm { return binary.LittleEndian.AppendUint16(a, v) }

// Code is the guest program (entered at CPL 0, drops to CPL 3 at once).
func Code() []byte {
	mmio := uint32(boot.VirtioMMIOBase)
	a := asm(synth.New(synth.LoadAddr).ToUser(0x80000, false).Bytes())
	// rep stosq the pattern.
	a = append(a, 0xBF)
	a = a.imm32(Pattern) // mov edi, Pattern
	a = append(a, 0xB9)
	a = a.imm32(PatternQwords) // mov ecx, n
	a = append(a, 0x48, 0xB8)  // mov rax, imm64
	a = binary.LittleEndian.AppendUint64(a, PatternValue)
	a = append(a, 0xF3, 0x48, 0xAB) // rep stosq
	// Request 1: avail.idx = 1, notify, wait for used.idx == 1.
	a = append(a, 0xB8).imm32(Avail + 2)
	a = append(a, 0x66, 0xC7, 0x00).imm16(1) // mov word [rax], 1
	a = append(a, 0xB8).imm32(mmio + virtio.RegQueueNotify)
	a = append(a, 0xC7, 0x00).imm32(0) // mov dword [rax], 0
	a = waitUsed(a, 1)
	// Notifications reach the device through an ioeventfd, so its drain
	// runs beside the vCPU and would take request 2 too if it were
	// posted while the drain still looks at the ring. The interrupt
	// status is set only after the drain's last look: wait for it.
	a = append(a, 0xBB).imm32(mmio + virtio.RegInterruptStat)
	a = append(a, 0x8B, 0x03) // w: mov eax, [rbx]
	a = append(a, 0x85, 0xC0) // test eax, eax
	a = append(a, 0x74, 0xFA) // je w
	// Request 2 posted, not notified: in flight.
	a = append(a, 0xB8).imm32(Avail + 2)
	a = append(a, 0x66, 0xC7, 0x00).imm16(2)
	a = append(a, 0xB8).imm32(Phase)
	a = append(a, 0xC7, 0x00).imm32(1)
	// Phase 1: count until [Go] != 0.
	a = append(a, 0xB8).imm32(Counter)
	a = append(a, 0xBB).imm32(Go)
	a = append(a, 0x48, 0xFF, 0x00) // l: inc qword [rax]
	a = append(a, 0x83, 0x3B, 0x00) // cmp dword [rbx], 0
	a = append(a, 0x74, 0xF8)       // je l
	// Notify, wait for request 2, phase 2.
	a = append(a, 0xB8).imm32(mmio + virtio.RegQueueNotify)
	a = append(a, 0xC7, 0x00).imm32(0)
	a = waitUsed(a, 2)
	a = append(a, 0xB8).imm32(Phase)
	a = append(a, 0xC7, 0x00).imm32(2)
	a = append(a, 0xB8).imm32(Counter2)
	a = append(a, 0x48, 0xFF, 0x00, 0xEB, 0xFB) // l: inc qword [rax]; jmp l
	return a
}

func waitUsed(a asm, n uint16) asm {
	a = append(a, 0xBB).imm32(Used + 2)
	a = append(a, 0x66, 0x81, 0x3B).imm16(n) // w: cmp word [rbx], n
	return append(a, 0x75, 0xF9)             // jne w
}

// Boot builds the machine, loads the guest and drives the virtio-rng
// handshake from the host (as firmware would): queue 0 with two
// device-writable descriptors. The VM is not started.
func Boot(spec machine.Spec) (*machine.Machine, error) {
	spec.Kernel = Code()
	m, err := machine.New(spec)
	if err != nil {
		return nil, err
	}
	mem := m.VM.Mem
	desc := make([]byte, 32)
	binary.LittleEndian.PutUint64(desc[0:], Buf0)
	binary.LittleEndian.PutUint32(desc[8:], BufLen)
	binary.LittleEndian.PutUint16(desc[12:], 2) // VIRTQ_DESC_F_WRITE
	binary.LittleEndian.PutUint64(desc[16:], Buf1)
	binary.LittleEndian.PutUint32(desc[24:], BufLen)
	binary.LittleEndian.PutUint16(desc[28:], 2)
	ring := make([]byte, 4+2*QueueSize)
	binary.LittleEndian.PutUint16(ring[4:], 0)
	binary.LittleEndian.PutUint16(ring[6:], 1)
	if err := mem.Write(Desc, desc); err != nil {
		m.VM.Close()
		return nil, err
	}
	if err := mem.Write(Avail, ring); err != nil {
		m.VM.Close()
		return nil, err
	}
	d := m.Slots[0].Dev
	w := func(off uint64, v uint32) { d.MMIOWrite(off, binary.LittleEndian.AppendUint32(nil, v)) }
	w(virtio.RegStatus, 0)
	w(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	w(virtio.RegDriverFeatSel, 1)
	w(virtio.RegDriverFeatures, 1) // VERSION_1
	w(virtio.RegDriverFeatSel, 0)
	w(virtio.RegDriverFeatures, 0)
	w(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK)
	w(virtio.RegQueueSel, 0)
	w(virtio.RegQueueNum, QueueSize)
	w(virtio.RegQueueDescLow, Desc)
	w(virtio.RegQueueAvailLow, Avail)
	w(virtio.RegQueueUsedLow, Used)
	w(virtio.RegQueueReady, 1)
	w(virtio.RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK)
	b := make([]byte, 4)
	d.MMIORead(virtio.RegStatus, b)
	if binary.LittleEndian.Uint32(b)&virtio.StatusDriverOK == 0 {
		m.VM.Close()
		return nil, fmt.Errorf("virtio-rng refused DRIVER_OK (status %#x)", b)
	}
	return m, nil
}

// U64 reads a guest word.
func U64(v *vm.VM, gpa uint64) uint64 {
	b, err := v.Mem.Slice(gpa, 8)
	if err != nil {
		return 0
	}
	return binary.LittleEndian.Uint64(b)
}

// U16 reads a guest half-word.
func U16(v *vm.VM, gpa uint64) uint16 {
	b, err := v.Mem.Slice(gpa, 2)
	if err != nil {
		return 0
	}
	return binary.LittleEndian.Uint16(b)
}

// Put64 writes a guest word.
func Put64(v *vm.VM, gpa, val uint64) error {
	return v.Mem.Write(gpa, binary.LittleEndian.AppendUint64(nil, val))
}

// UsedIdx is the device's used ring index.
func UsedIdx(v *vm.VM) uint16 { return U16(v, Used+2) }

// WaitFor polls cond every 50 us until it holds or timeout passes.
func WaitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Microsecond)
	}
	return true
}

// RunToPhase1 starts a booted machine and waits until the guest counts
// in phase 1 (request 1 done, request 2 in flight).
func RunToPhase1(m *machine.Machine) error {
	if err := m.VM.Start(); err != nil {
		return err
	}
	if !WaitFor(10*time.Second, func() bool { return U64(m.VM, Phase) == 1 && U64(m.VM, Counter) > 1000 }) {
		return fmt.Errorf("guest did not reach phase 1 (phase %d, counter %d, used %d, state %s)",
			U64(m.VM, Phase), U64(m.VM, Counter), UsedIdx(m.VM), m.VM.State())
	}
	if u := UsedIdx(m.VM); u != 1 {
		return fmt.Errorf("request 2 completed before the snapshot (used %d): not in flight", u)
	}
	return nil
}

// Serve runs a pre-started VMM for the synthetic guest on a control
// socket at path (vmmapi protocol; POST /restore builds the VM) until it
// is told to stop. With prepare set, the restore of that snapshot
// directory is prepared ahead (snapshot.Prepare).
func Serve(path, prepare string) error {
	return ServeWith(ServeConfig{Socket: path, Prepare: prepare})
}

// ServeConfig configures ServeWith.
type ServeConfig struct {
	Socket   string       // control socket path to listen on
	Listener net.Listener // or an inherited listener
	Prepare  string       // snapshot dir to prepare the restore of
	// KVMFD > 0 is an inherited /dev/kvm fd (each VM gets a duplicate).
	KVMFD int
	// BeforeStart: see snapshot.Controller.BeforeStart.
	BeforeStart func(m *machine.Machine) error
}

// ServeWith is Serve with an inherited listener and /dev/kvm and a
// hardening hook (a jailed `cube vmm-restore`).
func ServeWith(cfg ServeConfig) error {
	l := cfg.Listener
	if l == nil {
		var err error
		if l, err = net.Listen("unix", cfg.Socket); err != nil {
			return err
		}
	}
	prepare := cfg.Prepare
	done := make(chan struct{})
	spec := Spec
	if cfg.KVMFD > 0 {
		spec = func() machine.Spec {
			s := Spec()
			s.KVMFD = -1
			if d, err := unix.FcntlInt(uintptr(cfg.KVMFD), unix.F_DUPFD_CLOEXEC, 3); err == nil {
				s.KVMFD = d
			}
			return s
		}
	}
	ctl := &snapshot.Controller{Spec: spec, BeforeStart: cfg.BeforeStart}
	if prepare != "" {
		if err := ctl.Prepare(prepare); err != nil {
			return err
		}
	}
	ctl.OnStop = func() { close(done) }
	srv := vmmapi.NewServer(ctl, nil)
	go srv.Serve(l)
	<-done
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	ctl.Close()
	return nil
}

// Mem is a process's memory from /proc/PID/smaps_rollup, in bytes.
type Mem struct {
	RSS, PSS, PSSAnon, PSSFile uint64
}

// ReadMem reads /proc/PID/smaps_rollup.
func ReadMem(pid int) (Mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Mem{}, err
	}
	var m Mem
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "Rss:":
			m.RSS = v << 10
		case "Pss:":
			m.PSS = v << 10
		case "Pss_Anon:":
			m.PSSAnon = v << 10
		case "Pss_File:":
			m.PSSFile = v << 10
		}
	}
	if m.RSS == 0 {
		return m, fmt.Errorf("no Rss in /proc/%d/smaps_rollup", pid)
	}
	return m, nil
}
