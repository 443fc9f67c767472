//go:build linux

package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/cubesandbox/cube/internal/vmm/devices"
)

// Intel MultiProcessor Specification 1.4 tables, so a guest without ACPI
// finds its CPUs, the IOAPIC and the ISA interrupt routing.
const (
	mpIRQs          = 24
	mpAPICVersion   = 0x14
	mpIOAPICVersion = 0x11
	mpCPUEnabled    = 1
	mpCPUBSP        = 2
	mpEntryCPU      = 0
	mpEntryBus      = 1
	mpEntryIOAPIC   = 2
	mpEntryIOIntr   = 3
	mpEntryLIntr    = 4
	mpIntINT        = 0
	mpIntNMI        = 1
	mpIntExtINT     = 3
)

// MPTableSize is the size of the MP table for n vCPUs.
func MPTableSize(n int) int { return 16 + 44 + 20*n + 8 + 8 + 8*mpIRQs + 8*2 }

func checksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return -s
}

// WriteMPTable writes the MP floating pointer at EBDAStart and the
// configuration table after it, for n vCPUs with APIC ids 0..n-1 and one
// IOAPIC with identity-mapped ISA IRQs.
func WriteMPTable(mem devices.GuestMemory, n int) error {
	if n < 1 || n > 254 {
		return fmt.Errorf("mptable: %d vCPUs", n)
	}
	size := MPTableSize(n)
	b, err := mem.Slice(EBDAStart, uint64(size))
	if err != nil {
		return fmt.Errorf("mptable: %w", err)
	}
	clear(b)
	le := binary.LittleEndian
	// Floating pointer.
	fp := b[:16]
	copy(fp, "_MP_")
	le.PutUint32(fp[4:], EBDAStart+16)
	fp[8] = 1 // length in 16-byte units
	fp[9] = 4 // spec 1.4
	fp[10] = checksum(fp)
	// Configuration table.
	ct := b[16:]
	copy(ct, "PCMP")
	ct[6] = 4
	copy(ct[8:16], "CUBE    ")
	copy(ct[16:28], "MICROVM     ")
	le.PutUint32(ct[36:], LAPICAddr)
	o := 44
	ioapicID := byte(n)
	for i := 0; i < n; i++ {
		e := ct[o : o+20]
		e[0] = mpEntryCPU
		e[1] = byte(i)
		e[2] = mpAPICVersion
		e[3] = mpCPUEnabled
		if i == 0 {
			e[3] |= mpCPUBSP
		}
		le.PutUint32(e[4:], 0x600) // signature: family 6
		le.PutUint32(e[8:], 0x201) // features: FPU, APIC
		o += 20
	}
	bus := ct[o : o+8]
	bus[0] = mpEntryBus
	copy(bus[2:], "ISA   ")
	o += 8
	io := ct[o : o+8]
	io[0] = mpEntryIOAPIC
	io[1] = ioapicID
	io[2] = mpIOAPICVersion
	io[3] = 1
	le.PutUint32(io[4:], IOAPICAddr)
	o += 8
	for irq := 0; irq < mpIRQs; irq++ {
		e := ct[o : o+8]
		e[0] = mpEntryIOIntr
		e[1] = mpIntINT
		e[4] = 0 // ISA bus
		e[5] = byte(irq)
		e[6] = ioapicID
		e[7] = byte(irq)
		o += 8
	}
	for i, t := range []byte{mpIntExtINT, mpIntNMI} {
		e := ct[o : o+8]
		e[0] = mpEntryLIntr
		e[1] = t
		e[6] = 0xff // all local APICs
		e[7] = byte(i)
		o += 8
	}
	le.PutUint16(ct[4:], uint16(o))
	le.PutUint16(ct[34:], uint16(n+1+1+mpIRQs+2))
	ct[7] = checksum(ct[:o])
	return nil
}
