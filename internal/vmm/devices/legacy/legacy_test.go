package legacy

import (
	"testing"
	"time"
)

func TestCMOSTime(t *testing.T) {
	c := NewCMOS()
	c.now = func() time.Time { return time.Date(2026, 12, 3, 13, 45, 59, 0, time.UTC) }
	rd := func(i byte) byte {
		c.PIOWrite(CMOSIndexPort, []byte{i | 0x80})
		b := []byte{0}
		c.PIORead(CMOSDataPort, b)
		return b[0]
	}
	if rd(0) != 0x59 || rd(2) != 0x45 || rd(4) != 0x13 || rd(7) != 0x03 || rd(8) != 0x12 || rd(9) != 0x26 || rd(0x32) != 0x20 {
		t.Fatal("time registers")
	}
	if rd(0x0a)&0x80 != 0 || rd(0x0d)&0x80 == 0 {
		t.Fatal("status registers")
	}
	c.PIOWrite(CMOSIndexPort, []byte{0x40})
	c.PIOWrite(CMOSDataPort, []byte{0x77})
	if rd(0x40) != 0x77 {
		t.Fatal("nvram")
	}
}

func FuzzCMOS(f *testing.F) {
	f.Add([]byte{0x70, 0x0a, 0x71, 0x00, 0x70, 0x40, 0x71, 0x55})
	f.Fuzz(func(t *testing.T, ops []byte) {
		c := NewCMOS()
		for i := 0; i+1 < len(ops); i += 2 {
			port := uint16(0x70 + ops[i]&1)
			n := 1 + int(ops[i]>>1)%4
			b := make([]byte, n)
			b[0] = ops[i+1]
			if ops[i]&0x80 != 0 {
				c.PIORead(port, b)
			} else {
				c.PIOWrite(port, b)
			}
		}
		s, _ := c.SaveState()
		if err := NewCMOS().RestoreState(s); err != nil {
			t.Fatal(err)
		}
		NewCMOS().RestoreState(ops) // arbitrary state must be refused or accepted, never panic
	})
}
