package vmmapi

import (
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

// ReadVCPUs returns the registers of every vCPU of v for GET /debug/vcpus,
// pausing a running VM briefly. Every Controller serves it through this.
func ReadVCPUs(v *vm.VM) ([]VCPURegs, error) {
	if v.State() == vm.StateRunning {
		if err := v.Pause(); err != nil {
			return nil, errs.Wrap(errs.Conflict, err, "pause")
		}
		defer v.Resume()
	}
	if s := v.State(); s != vm.StatePaused && s != vm.StateCreated {
		return nil, errs.E(errs.Conflict, "vm is %s", s)
	}
	var out []VCPURegs
	for _, c := range v.CPUs {
		r, err := c.GetRegs()
		if err != nil {
			return nil, errs.Wrap(errs.Internal, err, "regs")
		}
		s, err := c.GetSregs()
		if err != nil {
			return nil, errs.Wrap(errs.Internal, err, "sregs")
		}
		mp, _ := c.GetMPState()
		out = append(out, VCPURegs{ID: c.ID, RIP: r.RIP, RSP: r.RSP, RFLAGS: r.RFLAGS, CR0: s.CR0, CR3: s.CR3,
			CR4: s.CR4, EFER: s.EFER, CS: s.CS.Selector, MPState: mp.State})
	}
	return out, nil
}
