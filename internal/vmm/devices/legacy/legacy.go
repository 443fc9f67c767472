// Package legacy holds the small PC devices Linux touches during boot on a
// machine without firmware: a CMOS real-time clock (so the guest reads the
// wall-clock time instead of spinning on an absent chip) and sinks for the
// POST/delay ports. Ports nobody models read as 0xFF via the bus default.
package legacy

import (
	"fmt"
	"sync"
	"time"
)

// CMOS ports.
const (
	CMOSIndexPort = 0x70
	CMOSDataPort  = 0x71
)

// CMOS is a read-mostly MC146818 RTC: registers 0-9 give the host's UTC
// time in BCD, status A/B/D report a valid clock in 24-hour mode with no
// update in progress; the other 118 bytes of NVRAM are plain storage.
type CMOS struct {
	mu    sync.Mutex
	index uint8
	nvram [128]byte
	now   func() time.Time
}

// NewCMOS returns a CMOS clock reading the host's time.
func NewCMOS() *CMOS { return &CMOS{now: time.Now} }

func bcd(v int) byte { return byte(v/10<<4 | v%10) }

// PIORead reads the index or data port.
func (c *CMOS) PIORead(port uint16, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range data {
		data[i] = 0xff
	}
	if len(data) != 1 || port != CMOSDataPort {
		return
	}
	t := c.now().UTC()
	var v byte
	switch c.index {
	case 0:
		v = bcd(t.Second())
	case 2:
		v = bcd(t.Minute())
	case 4:
		v = bcd(t.Hour())
	case 6:
		v = bcd(int(t.Weekday()) + 1)
	case 7:
		v = bcd(t.Day())
	case 8:
		v = bcd(int(t.Month()))
	case 9:
		v = bcd(t.Year() % 100)
	case 0x32:
		v = bcd(t.Year() / 100)
	case 0x0a:
		v = 0x26 // 32.768 kHz, no update in progress
	case 0x0b:
		v = 0x02 // 24-hour, BCD
	case 0x0c:
		v = 0
	case 0x0d:
		v = 0x80 // valid RAM and time
	default:
		v = c.nvram[c.index]
	}
	data[0] = v
}

// PIOWrite selects a register (0x70) or writes NVRAM (0x71).
func (c *CMOS) PIOWrite(port uint16, data []byte) {
	if len(data) != 1 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch port {
	case CMOSIndexPort:
		c.index = data[0] & 0x7f // bit 7 is the NMI mask
	case CMOSDataPort:
		if c.index > 0x0d && c.index != 0x32 {
			c.nvram[c.index] = data[0]
		}
	}
}

// Sink swallows writes and reads as zero (POST code port 0x80, delay
// port 0xED), so they are not counted as unhandled accesses.
type Sink struct{}

// PIORead reads zero.
func (Sink) PIORead(port uint16, data []byte) {
	for i := range data {
		data[i] = 0
	}
}

// PIOWrite ignores the write.
func (Sink) PIOWrite(port uint16, data []byte) {}

// SaveState encodes the index register and NVRAM (the clock follows the
// host).
func (c *CMOS) SaveState() ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := make([]byte, 0, 2+len(c.nvram))
	b = append(b, 1, c.index)
	return append(b, c.nvram[:]...), nil
}

// RestoreState restores SaveState's output; bad input changes nothing.
func (c *CMOS) RestoreState(b []byte) error {
	if len(b) != 2+len(c.nvram) || b[0] != 1 {
		return fmt.Errorf("cmos state: bad length or version")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.index = b[1] & 0x7f
	copy(c.nvram[:], b[2:])
	return nil
}
