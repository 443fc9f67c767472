package serial

import (
	"bytes"
	"sync/atomic"
	"testing"
)

type countIRQ struct{ n atomic.Int32 }

func (c *countIRQ) Trigger() error { c.n.Add(1); return nil }

func rd(u *UART, off uint16) byte {
	b := []byte{0}
	u.PIORead(COM1Port+off, b)
	return b[0]
}

func wr(u *UART, off uint16, v byte) { u.PIOWrite(COM1Port+off, []byte{v}) }

func TestTransmitAndInterrupts(t *testing.T) {
	var out bytes.Buffer
	irq := &countIRQ{}
	u := New(COM1Port, &out, irq)
	// Scratch register probe, as the 8250 driver does.
	wr(u, regSCR, 0xa5)
	if rd(u, regSCR) != 0xa5 {
		t.Fatal("scratch register")
	}
	if rd(u, regLSR)&lsrTHRE == 0 {
		t.Fatal("THR not empty")
	}
	if rd(u, regIIR)&0x0f != iirNone {
		t.Fatal("interrupt pending with IER=0")
	}
	wr(u, regData, 'a')
	if irq.n.Load() != 0 {
		t.Fatal("interrupt with IER=0")
	}
	wr(u, regIER, ierTHRI)
	if irq.n.Load() != 1 || rd(u, regIIR)&0x0f != iirTHRI {
		t.Fatal("enabling THRI must raise THRE")
	}
	if rd(u, regIIR)&0x0f != iirNone {
		t.Fatal("IIR read did not clear THRE")
	}
	wr(u, regData, 'b')
	if irq.n.Load() != 2 {
		t.Fatalf("irqs %d after transmit", irq.n.Load())
	}
	if out.String() != "ab" {
		t.Fatalf("out %q", out.String())
	}
	// Divisor latch does not transmit.
	wr(u, regLCR, lcrDLAB)
	wr(u, regData, 1)
	wr(u, regIER, 0)
	if rd(u, regData) != 1 || out.String() != "ab" {
		t.Fatal("DLAB")
	}
	wr(u, regLCR, 3)
}

func TestReceive(t *testing.T) {
	irq := &countIRQ{}
	u := New(COM1Port, nil, irq)
	wr(u, regIER, ierRDI)
	u.Input([]byte("hi"))
	if irq.n.Load() != 1 || rd(u, regIIR)&0x0f != iirRDI || rd(u, regLSR)&lsrDR == 0 {
		t.Fatal("RX interrupt")
	}
	if rd(u, regData) != 'h' || rd(u, regData) != 'i' || rd(u, regLSR)&lsrDR != 0 {
		t.Fatal("RX data")
	}
	u.Input(make([]byte, 10000))
	if len(u.st.RX) != rxMax {
		t.Fatal("RX not bounded")
	}
}

func TestState(t *testing.T) {
	u := New(COM1Port, nil, nil)
	wr(u, regSCR, 7)
	wr(u, regLCR, 3)
	u.Input([]byte("x"))
	s, err := u.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	v := New(COM1Port, nil, nil)
	if err := v.RestoreState(s); err != nil {
		t.Fatal(err)
	}
	if rd(v, regSCR) != 7 || rd(v, regLCR) != 3 || rd(v, regData) != 'x' {
		t.Fatal("restore")
	}
	if err := v.RestoreState([]byte(`{"version":9}`)); err == nil {
		t.Fatal("bad version accepted")
	}
}

func FuzzUART(f *testing.F) {
	f.Add([]byte{3, 0x80, 0, 1, 1, 2, 0, 'x'})
	f.Fuzz(func(t *testing.T, ops []byte) {
		u := New(COM1Port, nil, &countIRQ{})
		for i := 0; i+1 < len(ops); i += 2 {
			port := COM1Port + uint16(ops[i]&0x0f) // also hits ports past the UART
			n := 1 + int(ops[i]>>4)%8
			b := make([]byte, n)
			b[0] = ops[i+1]
			if ops[i]&0x80 != 0 {
				u.PIORead(port, b)
			} else {
				u.PIOWrite(port, b)
			}
		}
	})
}
