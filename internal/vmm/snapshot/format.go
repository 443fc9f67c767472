//go:build linux

package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"unsafe"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// File format (all integers little-endian):
//
//	header   "CUBESNAP" | u32 version | u32 section count
//	section  u32 tag | u32 length | payload     (repeated)
//	trailer  SHA-256 of every byte before it (32 bytes)
//
// The checksum is verified before any section is parsed, so a truncated
// or corrupted file is refused as a whole. KVM structures are stored in
// their kernel ABI layout (x86-64), each with an exact expected size.

// Magic opens every state file.
const Magic = "CUBESNAP"

// Version is the state file version this package writes and reads.
const Version = 1

// MaxFileSize bounds a state file (guest memory is a separate file).
const MaxFileSize = 64 << 20

// Section tags.
const (
	tagMeta    = 1
	tagVCPU    = 2
	tagIRQChip = 3
	tagPIT     = 4
	tagClock   = 5
	tagDevice  = 6
)

const (
	headerSize  = 16
	trailerSize = sha256.Size
	maxMSRs     = 4096
	maxCPUID    = 4096
	maxVCPUs    = 256
	maxDevices  = 256
)

// Meta describes the snapshot as a whole (JSON in the state file).
type Meta struct {
	MemSize uint64 `json:"mem_size"`
	VCPUs   int    `json:"vcpus"`
	// MemFile is the memory file's name, relative to the snapshot dir.
	MemFile string `json:"mem_file"`
	// Layers are diff layers applied over MemFile, oldest first.
	Layers  []Layer           `json:"layers,omitempty"`
	Created string            `json:"created,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
}

// Layer is a diff over the base memory: the pages listed (as runs) are
// read from File at the same offsets; every other page comes from below.
type Layer struct {
	File string `json:"file"`
	Runs []Run  `json:"runs"`
}

// Run is a range of pages [Page, Page+Count) of guest memory (host
// mapping order, 4 KiB pages).
type Run struct {
	Page  uint64 `json:"p"`
	Count uint64 `json:"n"`
}

// VCPUState is one vCPU's architectural state.
type VCPUState struct {
	ID     uint32
	Regs   kvm.Regs
	Sregs  kvm.Sregs
	XSave  kvm.XSave
	XCRs   kvm.XCRs
	LAPIC  kvm.LAPICState
	Events kvm.VCPUEvents
	Debug  kvm.DebugRegs
	MP     kvm.MPState
	MSRs   []kvm.MSREntry
	CPUID  []kvm.CPUIDEntry
}

// DeviceState is one device's own encoding (devices.Stateful).
type DeviceState struct {
	Name string
	Data []byte
}

// State is everything but guest memory.
type State struct {
	Meta    Meta
	VCPUs   []VCPUState
	IRQChip [3]kvm.IRQChip // PIC master, PIC slave, IOAPIC
	PIT     kvm.PITState2
	Clock   kvm.ClockData
	Devices []DeviceState
}

func raw[T any](p *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p))
}

type writer struct {
	b bytes.Buffer
	n uint32
}

func (w *writer) section(tag uint32, parts ...[]byte) {
	var l int
	for _, p := range parts {
		l += len(p)
	}
	var h [8]byte
	binary.LittleEndian.PutUint32(h[0:], tag)
	binary.LittleEndian.PutUint32(h[4:], uint32(l))
	w.b.Write(h[:])
	for _, p := range parts {
		w.b.Write(p)
	}
	w.n++
}

func u32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

// Encode renders the state file, checksum included.
func (s *State) Encode() ([]byte, error) {
	meta, err := json.Marshal(s.Meta)
	if err != nil {
		return nil, err
	}
	w := &writer{}
	w.b.Write(make([]byte, headerSize))
	w.section(tagMeta, meta)
	for i := range s.VCPUs {
		c := &s.VCPUs[i]
		msrs := make([]byte, 0, 16*len(c.MSRs))
		for j := range c.MSRs {
			msrs = append(msrs, raw(&c.MSRs[j])...)
		}
		cpuid := make([]byte, 0, 40*len(c.CPUID))
		for j := range c.CPUID {
			cpuid = append(cpuid, raw(&c.CPUID[j])...)
		}
		w.section(tagVCPU, u32(c.ID), raw(&c.Regs), raw(&c.Sregs), raw(&c.XSave), raw(&c.XCRs),
			raw(&c.LAPIC), raw(&c.Events), raw(&c.Debug), raw(&c.MP),
			u32(uint32(len(c.MSRs))), msrs, u32(uint32(len(c.CPUID))), cpuid)
	}
	for i := range s.IRQChip {
		w.section(tagIRQChip, raw(&s.IRQChip[i]))
	}
	w.section(tagPIT, raw(&s.PIT))
	w.section(tagClock, raw(&s.Clock))
	for _, d := range s.Devices {
		if len(d.Name) == 0 || len(d.Name) > 255 {
			return nil, fmt.Errorf("device name %q: must be 1..255 bytes", d.Name)
		}
		w.section(tagDevice, []byte{byte(len(d.Name))}, []byte(d.Name), d.Data)
	}
	out := w.b.Bytes()
	copy(out, Magic)
	binary.LittleEndian.PutUint32(out[8:], Version)
	binary.LittleEndian.PutUint32(out[12:], w.n)
	sum := sha256.Sum256(out)
	out = append(out, sum[:]...)
	if len(out) > MaxFileSize {
		return nil, fmt.Errorf("state file would be %d bytes, limit %d", len(out), MaxFileSize)
	}
	return out, nil
}

// corrupt is the error for every malformed state file.
func corrupt(format string, args ...any) error {
	return errs.E(errs.InvalidArgument, "snapshot state file is corrupt: "+format, args...)
}

// reader consumes a payload with bounds checks.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = corrupt("section truncated (need %d bytes, have %d)", n, len(r.b))
		return nil
	}
	p := r.b[:n]
	r.b = r.b[n:]
	return p
}

func (r *reader) u32() uint32 {
	p := r.take(4)
	if p == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(p)
}

func into[T any](r *reader, dst *T) {
	p := r.take(int(unsafe.Sizeof(*dst)))
	if p != nil {
		copy(raw(dst), p)
	}
}

// Decode parses and verifies a state file. Any defect (wrong magic,
// version, checksum, truncation, inconsistent sections) is an
// errs.InvalidArgument error; nothing is partially returned.
func Decode(b []byte) (*State, error) {
	if len(b) > MaxFileSize {
		return nil, corrupt("%d bytes exceeds the %d byte limit", len(b), MaxFileSize)
	}
	if len(b) < headerSize+trailerSize {
		return nil, corrupt("truncated: %d bytes", len(b))
	}
	if string(b[:8]) != Magic {
		return nil, corrupt("bad magic %q", b[:8])
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != Version {
		return nil, errs.E(errs.FailedPrecondition, "snapshot state file version %d is not supported (want %d)", v, Version)
	}
	body := b[:len(b)-trailerSize]
	sum := sha256.Sum256(body)
	if !bytes.Equal(sum[:], b[len(body):]) {
		return nil, corrupt("checksum mismatch (file truncated or modified)")
	}
	nsec := binary.LittleEndian.Uint32(b[12:])
	r := &reader{b: body[headerSize:]}
	s := &State{}
	var haveMeta, havePIT, haveClock bool
	var chips [3]bool
	names := map[string]bool{}
	for i := uint32(0); i < nsec; i++ {
		tag := r.u32()
		l := r.u32()
		p := r.take(int(l))
		if r.err != nil {
			return nil, r.err
		}
		sr := &reader{b: p}
		switch tag {
		case tagMeta:
			if haveMeta {
				return nil, corrupt("two meta sections")
			}
			haveMeta = true
			if err := json.Unmarshal(p, &s.Meta); err != nil {
				return nil, corrupt("meta: %v", err)
			}
			sr.b = nil
		case tagVCPU:
			if len(s.VCPUs) >= maxVCPUs {
				return nil, corrupt("too many vCPUs")
			}
			var c VCPUState
			c.ID = sr.u32()
			into(sr, &c.Regs)
			into(sr, &c.Sregs)
			into(sr, &c.XSave)
			into(sr, &c.XCRs)
			into(sr, &c.LAPIC)
			into(sr, &c.Events)
			into(sr, &c.Debug)
			into(sr, &c.MP)
			n := sr.u32()
			if n > maxMSRs {
				return nil, corrupt("vCPU %d: %d MSRs", c.ID, n)
			}
			c.MSRs = make([]kvm.MSREntry, n)
			for j := range c.MSRs {
				into(sr, &c.MSRs[j])
			}
			n = sr.u32()
			if n > maxCPUID {
				return nil, corrupt("vCPU %d: %d CPUID entries", c.ID, n)
			}
			c.CPUID = make([]kvm.CPUIDEntry, n)
			for j := range c.CPUID {
				into(sr, &c.CPUID[j])
			}
			if sr.err != nil {
				return nil, sr.err
			}
			s.VCPUs = append(s.VCPUs, c)
		case tagIRQChip:
			var c kvm.IRQChip
			into(sr, &c)
			if sr.err != nil {
				return nil, sr.err
			}
			if c.ChipID > 2 || chips[c.ChipID] {
				return nil, corrupt("irqchip id %d unknown or repeated", c.ChipID)
			}
			chips[c.ChipID] = true
			s.IRQChip[c.ChipID] = c
		case tagPIT:
			if havePIT {
				return nil, corrupt("two PIT sections")
			}
			havePIT = true
			into(sr, &s.PIT)
		case tagClock:
			if haveClock {
				return nil, corrupt("two clock sections")
			}
			haveClock = true
			into(sr, &s.Clock)
		case tagDevice:
			if len(s.Devices) >= maxDevices {
				return nil, corrupt("too many devices")
			}
			nl := sr.take(1)
			if sr.err != nil {
				return nil, sr.err
			}
			name := string(sr.take(int(nl[0])))
			if sr.err != nil || name == "" || names[name] {
				return nil, corrupt("device name %q empty, truncated or repeated", name)
			}
			names[name] = true
			s.Devices = append(s.Devices, DeviceState{Name: name, Data: append([]byte(nil), sr.b...)})
			sr.b = nil
		default:
			return nil, corrupt("unknown section tag %d", tag)
		}
		if sr.err != nil {
			return nil, sr.err
		}
		if len(sr.b) != 0 {
			return nil, corrupt("section tag %d has %d trailing bytes", tag, len(sr.b))
		}
	}
	if len(r.b) != 0 {
		return nil, corrupt("%d bytes after the last section", len(r.b))
	}
	if !haveMeta || !havePIT || !haveClock || !chips[0] || !chips[1] || !chips[2] {
		return nil, corrupt("missing sections (meta %v, pit %v, clock %v, irqchips %v)", haveMeta, havePIT, haveClock, chips)
	}
	if err := s.validate(); err != nil {
		return nil, err
	}
	return s, nil
}

// validate checks cross-section consistency.
func (s *State) validate() error {
	m := s.Meta
	if m.MemSize < 1<<20 || m.MemSize%4096 != 0 || m.MemSize > 1<<40 {
		return corrupt("guest memory size %d", m.MemSize)
	}
	if m.VCPUs < 1 || m.VCPUs != len(s.VCPUs) {
		return corrupt("meta says %d vCPUs, file has %d", m.VCPUs, len(s.VCPUs))
	}
	for i, c := range s.VCPUs {
		if int(c.ID) != i {
			return corrupt("vCPU %d has id %d", i, c.ID)
		}
	}
	if !safeName(m.MemFile) {
		return corrupt("memory file name %q", m.MemFile)
	}
	pages := m.MemSize / 4096
	for _, l := range m.Layers {
		if !safeName(l.File) {
			return corrupt("layer file name %q", l.File)
		}
		var next uint64
		for _, r := range l.Runs {
			if r.Count == 0 || r.Page < next || r.Page+r.Count > pages || r.Page+r.Count < r.Page {
				return corrupt("layer %s: run %+v out of order or outside %d pages", l.File, r, pages)
			}
			next = r.Page + r.Count
		}
	}
	return nil
}

// safeName accepts a plain file name inside the snapshot directory.
func safeName(n string) bool {
	if n == "" || n == "." || n == ".." || len(n) > 255 {
		return false
	}
	for i := 0; i < len(n); i++ {
		if n[i] == '/' || n[i] == 0 {
			return false
		}
	}
	return true
}
