package i8042

import "testing"

func TestProbeAndReset(t *testing.T) {
	resets := 0
	c := New(func() { resets++ })
	b := []byte{0}
	w := func(p uint16, v byte) { c.PIOWrite(p, []byte{v}) }
	r := func(p uint16) byte { c.PIORead(p, b); return b[0] }
	if r(CommandPort) == 0xff {
		t.Fatal("status reads as absent controller")
	}
	w(CommandPort, cmdSelfTest)
	if r(CommandPort)&statusOBF == 0 || r(DataPort) != 0x55 {
		t.Fatal("self test")
	}
	w(CommandPort, cmdReadCTR)
	ctr := r(DataPort)
	w(CommandPort, cmdWriteCTR)
	w(DataPort, ctr|0x30)
	w(CommandPort, cmdReadCTR)
	if r(DataPort) != ctr|0x30 {
		t.Fatal("CTR write")
	}
	if resets != 0 {
		t.Fatal("spurious reset")
	}
	w(CommandPort, cmdReset)
	if resets != 1 {
		t.Fatal("0xFE did not reset")
	}
	w(CommandPort, cmdWriteOut)
	w(DataPort, 0x00)
	if resets != 2 {
		t.Fatal("output port bit 0 did not reset")
	}
	s, _ := c.SaveState()
	if err := New(nil).RestoreState(s); err != nil {
		t.Fatal(err)
	}
}

func FuzzI8042(f *testing.F) {
	f.Add([]byte{0x64, 0x20, 0x60, 0x00, 0x64, 0xd1, 0x60, 0x01})
	f.Fuzz(func(t *testing.T, ops []byte) {
		c := New(func() {})
		for i := 0; i+1 < len(ops); i += 2 {
			port := uint16(DataPort)
			if ops[i]&1 != 0 {
				port = CommandPort
			}
			if ops[i]&2 != 0 {
				c.PIORead(port, []byte{0})
			} else {
				c.PIOWrite(port, []byte{ops[i+1]})
			}
		}
		if len(c.st.Out) > 16 {
			t.Fatal("output buffer unbounded")
		}
	})
}
