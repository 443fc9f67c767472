// Package serial is a 16550A-compatible UART (8250 family) on port I/O:
// the guest console. Transmitted bytes go to an io.Writer (the serial
// log); bytes queued with Input are received by the guest. It raises its
// interrupt line for "received data available" and "transmitter holding
// register empty", which the Linux 8250 driver needs for its tty path.
package serial

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"

	"github.com/cubesandbox/cube/internal/vmm/devices"
)

// Standard PC COM ports and IRQs.
const (
	COM1Port = 0x3F8
	COM1IRQ  = 4
	NumPorts = 8
)

// Register offsets.
const (
	regData = 0 // RBR / THR, DLL when DLAB
	regIER  = 1 // DLM when DLAB
	regIIR  = 2 // FCR on write
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7
)

// Bits.
const (
	ierRDI  = 0x01
	ierTHRI = 0x02

	iirNone = 0x01
	iirTHRI = 0x02
	iirRDI  = 0x04
	iirFIFO = 0xC0

	lcrDLAB = 0x80

	mcrLoop = 0x10

	lsrDR   = 0x01
	lsrTHRE = 0x20
	lsrTEMT = 0x40

	msrDCD = 0x80
	msrDSR = 0x20
	msrCTS = 0x10

	rxMax = 4096
)

// UART is one serial port. It implements devices.PIODevice and
// devices.Stateful.
type UART struct {
	mu   sync.Mutex
	base uint16
	out  io.Writer
	irq  devices.IRQLine

	st state
}

type state struct {
	IER, LCR, MCR, SCR, DLL, DLM, FCR uint8
	THRIPending                       bool
	RX                                []byte
}

// New returns a UART at base writing to out (nil discards) and raising
// irq (nil: no interrupts).
func New(base uint16, out io.Writer, irq devices.IRQLine) *UART {
	if out == nil {
		out = io.Discard
	}
	u := &UART{base: base, out: out, irq: irq}
	u.st.DLL = 12 // 9600 baud
	u.st.MCR = 0x08
	return u
}

// interrupt returns the highest-priority pending interrupt (IIR).
func (u *UART) interrupt() uint8 {
	switch {
	case u.st.IER&ierRDI != 0 && len(u.st.RX) > 0:
		return iirRDI
	case u.st.IER&ierTHRI != 0 && u.st.THRIPending:
		return iirTHRI
	}
	return iirNone
}

// update raises the line if an interrupt became pending.
func (u *UART) update(before uint8) {
	if after := u.interrupt(); after != iirNone && after != before && u.irq != nil {
		_ = u.irq.Trigger()
	}
}

// PIORead reads a register.
func (u *UART) PIORead(port uint16, data []byte) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i := range data {
		data[i] = 0
	}
	if len(data) != 1 {
		return
	}
	before := u.interrupt()
	var v uint8
	switch port - u.base {
	case regData:
		if u.st.LCR&lcrDLAB != 0 {
			v = u.st.DLL
		} else if len(u.st.RX) > 0 {
			v = u.st.RX[0]
			u.st.RX = u.st.RX[1:]
		}
	case regIER:
		if u.st.LCR&lcrDLAB != 0 {
			v = u.st.DLM
		} else {
			v = u.st.IER
		}
	case regIIR:
		v = u.interrupt()
		if v == iirTHRI {
			u.st.THRIPending = false // reading IIR clears THRE
		}
		if u.st.FCR&1 != 0 {
			v |= iirFIFO
		}
	case regLCR:
		v = u.st.LCR
	case regMCR:
		v = u.st.MCR
	case regLSR:
		v = lsrTHRE | lsrTEMT
		if len(u.st.RX) > 0 {
			v |= lsrDR
		}
	case regMSR:
		if u.st.MCR&mcrLoop != 0 {
			v = (u.st.MCR & 0x0f) << 4
		} else {
			v = msrDCD | msrDSR | msrCTS
		}
	case regSCR:
		v = u.st.SCR
	}
	data[0] = v
	u.update(before)
}

// PIOWrite writes a register.
func (u *UART) PIOWrite(port uint16, data []byte) {
	if len(data) != 1 {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	before := u.interrupt()
	v := data[0]
	switch port - u.base {
	case regData:
		if u.st.LCR&lcrDLAB != 0 {
			u.st.DLL = v
			break
		}
		if u.st.MCR&mcrLoop != 0 {
			u.pushRX([]byte{v})
		} else {
			_, _ = u.out.Write([]byte{v})
		}
		// The byte left at once: THR is empty again.
		u.st.THRIPending = true
		before = iirNone
	case regIER:
		if u.st.LCR&lcrDLAB != 0 {
			u.st.DLM = v
			break
		}
		if v&ierTHRI != 0 && u.st.IER&ierTHRI == 0 {
			u.st.THRIPending = true // enabling THRI with THR empty interrupts
		}
		u.st.IER = v & 0x0f
	case regIIR:
		u.st.FCR = v
		if v&0x02 != 0 {
			u.st.RX = nil
		}
	case regLCR:
		u.st.LCR = v
	case regMCR:
		u.st.MCR = v & 0x1f
	case regSCR:
		u.st.SCR = v
	}
	u.update(before)
}

func (u *UART) pushRX(b []byte) {
	room := rxMax - len(u.st.RX)
	if room < len(b) {
		b = b[:room]
	}
	u.st.RX = append(u.st.RX, b...)
}

// Input queues bytes for the guest to read (console input); bytes beyond
// the 4 KiB buffer are dropped.
func (u *UART) Input(b []byte) {
	u.mu.Lock()
	defer u.mu.Unlock()
	before := u.interrupt()
	u.pushRX(b)
	u.update(before)
}

const stateVersion = 1

type savedState struct {
	Version int   `json:"version"`
	State   state `json:"state"`
}

// SaveState encodes the registers and receive buffer.
func (u *UART) SaveState() ([]byte, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return json.Marshal(savedState{Version: stateVersion, State: u.st})
}

// RestoreState restores SaveState's output; bad input changes nothing.
func (u *UART) RestoreState(b []byte) error {
	var s savedState
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("serial state: %w", err)
	}
	if s.Version != stateVersion {
		return fmt.Errorf("serial state version %d, want %d", s.Version, stateVersion)
	}
	if len(s.State.RX) > rxMax {
		return fmt.Errorf("serial state: receive buffer of %d bytes", len(s.State.RX))
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.st = s.State
	return nil
}
