// Package i8042 is the PC keyboard controller, reduced to what a microVM
// needs: enough of the command set for Linux's probe to succeed, and the
// CPU reset line (command 0xFE, or output-port bit 0 cleared), which the
// VMM turns into a VM stop. No keyboard or mouse is attached.
package i8042

import (
	"encoding/json"
	"fmt"
	"sync"
)

// Ports.
const (
	DataPort    = 0x60
	CommandPort = 0x64
)

const (
	statusOBF    = 0x01
	statusSYS    = 0x04
	statusCmd    = 0x08
	ctrKbdDis    = 0x10
	ctrAuxDis    = 0x20
	cmdReadCTR   = 0x20
	cmdWriteCTR  = 0x60
	cmdAuxDis    = 0xA7
	cmdAuxEn     = 0xA8
	cmdAuxTest   = 0xA9
	cmdSelfTest  = 0xAA
	cmdKbdTest   = 0xAB
	cmdKbdDis    = 0xAD
	cmdKbdEn     = 0xAE
	cmdReadOut   = 0xD0
	cmdWriteOut  = 0xD1
	cmdPulseBase = 0xF0
	cmdReset     = 0xFE
)

// Controller is the i8042. It implements devices.PIODevice (register it
// on port 0x60 and, separately, port 0x64) and devices.Stateful.
type Controller struct {
	mu      sync.Mutex
	onReset func()
	st      state
}

type state struct {
	CTR     uint8
	Out     []byte // output buffer (controller replies)
	Pending uint8  // command awaiting a data byte
	OutPort uint8
	LastCmd bool // last write was to the command port
}

// New returns a controller calling onReset when the guest resets the CPU.
func New(onReset func()) *Controller {
	return &Controller{onReset: onReset, st: state{CTR: 0x45, OutPort: 0x01}}
}

func (c *Controller) push(b byte) {
	if len(c.st.Out) < 16 {
		c.st.Out = append(c.st.Out, b)
	}
}

// PIORead reads the data or status port.
func (c *Controller) PIORead(port uint16, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range data {
		data[i] = 0
	}
	if len(data) != 1 {
		return
	}
	switch port {
	case DataPort:
		if len(c.st.Out) > 0 {
			data[0] = c.st.Out[0]
			c.st.Out = c.st.Out[1:]
		}
	case CommandPort:
		s := uint8(statusSYS)
		if len(c.st.Out) > 0 {
			s |= statusOBF
		}
		if c.st.LastCmd {
			s |= statusCmd
		}
		data[0] = s
	}
}

// PIOWrite writes a command or data byte.
func (c *Controller) PIOWrite(port uint16, data []byte) {
	if len(data) != 1 {
		return
	}
	reset := false
	c.mu.Lock()
	v := data[0]
	switch port {
	case CommandPort:
		c.st.LastCmd = true
		c.st.Pending = 0
		switch {
		case v == cmdReadCTR:
			c.push(c.st.CTR)
		case v == cmdWriteCTR || v == cmdWriteOut:
			c.st.Pending = v
		case v == cmdSelfTest:
			c.push(0x55)
		case v == cmdKbdTest || v == cmdAuxTest:
			c.push(0x00)
		case v == cmdKbdDis:
			c.st.CTR |= ctrKbdDis
		case v == cmdKbdEn:
			c.st.CTR &^= ctrKbdDis
		case v == cmdAuxDis:
			c.st.CTR |= ctrAuxDis
		case v == cmdAuxEn:
			c.st.CTR &^= ctrAuxDis
		case v == cmdReadOut:
			c.push(c.st.OutPort)
		case v >= cmdPulseBase && v&0x01 == 0: // pulse output bit 0 low: 0xFE, 0xFC, ...
			reset = true
		}
	case DataPort:
		c.st.LastCmd = false
		switch c.st.Pending {
		case cmdWriteCTR:
			c.st.CTR = v
		case cmdWriteOut:
			c.st.OutPort = v
			if v&0x01 == 0 {
				reset = true
			}
		default:
			// No keyboard: bytes for the device are dropped.
		}
		c.st.Pending = 0
	}
	c.mu.Unlock()
	if reset && c.onReset != nil {
		c.onReset()
	}
}

const stateVersion = 1

type savedState struct {
	Version int   `json:"version"`
	State   state `json:"state"`
}

// SaveState encodes the controller state.
func (c *Controller) SaveState() ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return json.Marshal(savedState{stateVersion, c.st})
}

// RestoreState restores SaveState's output; bad input changes nothing.
func (c *Controller) RestoreState(b []byte) error {
	var s savedState
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("i8042 state: %w", err)
	}
	if s.Version != stateVersion || len(s.State.Out) > 16 {
		return fmt.Errorf("i8042 state: bad version or buffer")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.st = s.State
	return nil
}
