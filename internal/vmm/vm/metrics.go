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
	StartedAt time.Time
	Pauses    atomic.Uint64
	exits     [maxExitReason + 1]atomic.Uint64
}

func (m *Metrics) init() {}

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
		VCPUs:         v.cfg.VCPUs,
		MemBytes:      v.cfg.MemSize,
	}
	if !v.Metrics.StartedAt.IsZero() {
		s.UptimeSeconds = time.Since(v.Metrics.StartedAt).Seconds()
	}
	return s
}
