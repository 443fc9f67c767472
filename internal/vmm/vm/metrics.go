//go:build linux

package vm

import (
	"sync/atomic"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

const maxExitReason = 64

// Metrics are VM counters, safe for concurrent reads.
type Metrics struct {
	startedAt atomic.Int64 // unix nanoseconds; 0 = not started
	Pauses    atomic.Uint64
	// Notifies counts virtio queue notifications served through ioeventfds.
	Notifies atomic.Uint64
	exits    [maxExitReason + 1]atomic.Uint64
}

func (m *Metrics) init() {}

// StartedAt is when the VM started (zero before Start).
func (m *Metrics) StartedAt() time.Time {
	n := m.startedAt.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func (m *Metrics) count(reason uint32) {
	if reason > maxExitReason {
		reason = maxExitReason
	}
	m.exits[reason].Add(1)
}

// Exits returns exit counts by reason name (non-zero only).
func (m *Metrics) Exits() map[string]uint64 {
	out := map[string]uint64{}
	for i := range m.exits {
		if n := m.exits[i].Load(); n != 0 {
			name := kvm.ExitName(uint32(i))
			if i == maxExitReason {
				name = "other"
			}
			out[name] = n
		}
	}
	return out
}

// Snapshot is a JSON-friendly view of the VM's metrics.
type Snapshot struct {
	State         string            `json:"state"`
	UptimeSeconds float64           `json:"uptime_seconds"`
	Exits         map[string]uint64 `json:"exits"`
	PIOUnhandled  uint64            `json:"pio_unhandled"`
	MMIOUnhandled uint64            `json:"mmio_unhandled"`
	Pauses        uint64            `json:"pauses"`
	Notifies      uint64            `json:"ioeventfd_notifies"`
	VCPUs         int               `json:"vcpus"`
	MemBytes      uint64            `json:"mem_bytes"`
}

// MetricsSnapshot returns the VM's metrics now.
func (v *VM) MetricsSnapshot() Snapshot {
	s := Snapshot{
		State:         v.State().String(),
		Exits:         v.Metrics.Exits(),
		PIOUnhandled:  v.PIO.Unhandled.Load(),
		MMIOUnhandled: v.MMIO.Unhandled.Load(),
		Pauses:        v.Metrics.Pauses.Load(),
		Notifies:      v.Metrics.Notifies.Load(),
		VCPUs:         v.cfg.VCPUs,
		MemBytes:      v.cfg.MemSize,
	}
	if t := v.Metrics.StartedAt(); !t.IsZero() {
		s.UptimeSeconds = time.Since(t).Seconds()
	}
	return s
}
