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
