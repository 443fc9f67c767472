//go:build linux

// Package snapshot saves and restores whole microVMs. A snapshot is a
// directory holding a versioned, SHA-256-checksummed state file (every
// vCPU's registers, special registers, XSAVE, XCRs, MSRs, LAPIC, events,
// debug registers and MP state; the VM's PIC, IOAPIC, PIT and kvmclock;
// each device's own state through devices.Stateful) and guest memory as a
// separate raw file. Restore builds a new VM whose RAM maps that file
// MAP_PRIVATE (nothing is read or copied up front; clones of one snapshot
// share its page cache and each clone's writes are its own), sets the
// state and lets the caller start the vCPUs. Diff snapshots of a restored
// VM write only the pages it changed, as layers over the base file.
// See docs/snapshot.md.
package snapshot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

// File names inside a snapshot directory.
const (
	StateFile  = "state"
	MemoryFile = "memory"
)

// Quiescer is implemented by devices that must stop touching guest memory
// while a snapshot is taken (virtio transports).
type Quiescer interface {
	Pause()
	Resume()
}

var (
	msrOnce sync.Once
	msrList []uint32
	msrErr  error
)

// savedMSRs is KVM_GET_MSR_INDEX_LIST filtered to the MSRs this host lets
// a vCPU read (some listed ones depend on CPU features the guest lacks).
func savedMSRs(sys *kvm.System, c *kvm.VCPU) ([]uint32, error) {
	msrOnce.Do(func() {
		all, err := sys.MSRIndexList()
		if err != nil {
			msrErr = err
			return
		}
		for _, idx := range all {
			e := []kvm.MSREntry{{Index: idx}}
			if n, err := c.GetMSRs(e); err == nil && n == 1 {
				msrList = append(msrList, idx)
			}
		}
	})
	return msrList, msrErr
}

// captureVCPU reads one vCPU (which must be outside KVM_RUN).
func captureVCPU(sys *kvm.System, c *kvm.VCPU) (s VCPUState, err error) {
	s.ID = uint32(c.ID)
	if s.MP, err = c.GetMPState(); err != nil {
		return
	}
	if s.Regs, err = c.GetRegs(); err != nil {
		return
	}
	if s.Sregs, err = c.GetSregs(); err != nil {
		return
	}
	if s.XSave, err = c.GetXSave(); err != nil {
		return
	}
	if s.XCRs, err = c.GetXCRs(); err != nil {
		return
	}
	if s.Debug, err = c.GetDebugRegs(); err != nil {
		return
	}
	if s.LAPIC, err = c.GetLAPIC(); err != nil {
		return
	}
	idx, err := savedMSRs(sys, c)
	if err != nil {
		return
	}
	s.MSRs = make([]kvm.MSREntry, len(idx))
	for i, x := range idx {
		s.MSRs[i].Index = x
	}
	n, err := c.GetMSRs(s.MSRs)
	if err != nil {
		return
	}
	if n != len(s.MSRs) {
		return s, fmt.Errorf("vcpu %d: read %d of %d MSRs (stopped at %#x)", c.ID, n, len(s.MSRs), s.MSRs[n].Index)
	}
	if s.Events, err = c.GetVCPUEvents(); err != nil {
		return
	}
	s.CPUID, err = c.GetCPUID2()
	return
}

// Capture reads the state of a paused (or never started) VM and its
// devices. Guest memory is not included.
func Capture(v *vm.VM) (*State, error) {
	if st := v.State(); st == vm.StateRunning {
		return nil, errs.E(errs.FailedPrecondition, "snapshot: vm is running; pause it first")
	}
	s := &State{Meta: Meta{MemSize: v.Mem.Size(), VCPUs: len(v.CPUs), MemFile: MemoryFile}}
	if v.State() == vm.StatePaused {
		// A vCPU parked right after a PIO/MMIO exit still owes KVM the
		// completion of that instruction; KVM_RUN with immediate_exit set
		// (Pause sets it) completes it and returns EINTR without entering
		// the guest, so the saved registers are past the instruction.
		for _, c := range v.CPUs {
			if !c.ImmediateExit() {
				return nil, errs.E(errs.Internal, "snapshot: vcpu %d paused without immediate_exit", c.ID)
			}
			if err := c.Run(); err != nil && err != unix.EINTR {
				return nil, errs.Wrap(errs.Internal, err, "snapshot: complete pending I/O on vcpu %d: %v", c.ID, err)
			}
		}
	}
	for _, c := range v.CPUs {
		cs, err := captureVCPU(v.System(), c.VCPU)
		if err != nil {
			return nil, err
		}
		s.VCPUs = append(s.VCPUs, cs)
	}
	var err error
	for i := range s.IRQChip {
		if s.IRQChip[i], err = v.KVM.GetIRQChip(uint32(i)); err != nil {
			return nil, err
		}
	}
	if s.PIT, err = v.KVM.GetPIT2(); err != nil {
		return nil, err
	}
	if s.Clock, err = v.KVM.GetClock(); err != nil {
		return nil, err
	}
	for _, d := range v.Devices() {
		sd, ok := d.Dev.(interface {
			SaveState() ([]byte, error)
		})
		if !ok {
			continue
		}
		b, err := sd.SaveState()
		if err != nil {
			return nil, fmt.Errorf("device %s: %w", d.Name, err)
		}
		s.Devices = append(s.Devices, DeviceState{Name: d.Name, Data: b})
	}
	return s, nil
}

// Check verifies that s fits v (same memory size, vCPUs and stateful
// devices) without changing anything.
func (s *State) Check(v *vm.VM) error {
	if s.Meta.MemSize != v.Mem.Size() {
		return errs.E(errs.FailedPrecondition, "snapshot has %d bytes of RAM, vm has %d", s.Meta.MemSize, v.Mem.Size())
	}
	if len(s.VCPUs) != len(v.CPUs) {
		return errs.E(errs.FailedPrecondition, "snapshot has %d vCPUs, vm has %d", len(s.VCPUs), len(v.CPUs))
	}
	have := v.StatefulDevices()
	for _, d := range s.Devices {
		if _, ok := have[d.Name]; !ok {
			return errs.E(errs.FailedPrecondition, "snapshot has state for device %q the vm lacks", d.Name)
		}
		delete(have, d.Name)
	}
	for name := range have {
		return errs.E(errs.FailedPrecondition, "vm device %q has no state in the snapshot", name)
	}
	return nil
}

// Apply loads s into a freshly created, not started VM whose memory
// already holds the snapshot's RAM. On error the VM must be discarded.
func Apply(v *vm.VM, s *State) error {
	if v.State() != vm.StateCreated {
		return errs.E(errs.FailedPrecondition, "restore: vm is %s, not freshly created", v.State())
	}
	if err := s.Check(v); err != nil {
		return err
	}
	// VM-wide state first (the LAPICs set below route through it).
	if err := v.KVM.SetPIT2(s.PIT); err != nil {
		return err
	}
	clk := s.Clock
	clk.Flags = 0 // only the clock value is settable; other flags are outputs
	if err := v.KVM.SetClock(clk); err != nil {
		return err
	}
	for i := range s.IRQChip {
		if err := v.KVM.SetIRQChip(s.IRQChip[i]); err != nil {
			return err
		}
	}
	for i, c := range v.CPUs {
		if err := applyVCPU(c.VCPU, &s.VCPUs[i]); err != nil {
			return err
		}
	}
	stateful := v.StatefulDevices()
	for _, d := range s.Devices {
		if err := stateful[d.Name].RestoreState(d.Data); err != nil {
			return errs.Wrap(errs.InvalidArgument, err, "restore device %s", d.Name)
		}
	}
	return nil
}

const msrTSCDeadline = 0x6e0

func applyVCPU(c *kvm.VCPU, s *VCPUState) error {
	if len(s.CPUID) > 0 {
		if err := c.SetCPUID2(s.CPUID); err != nil {
			return err
		}
	}
	if err := c.SetSregs(s.Sregs); err != nil {
		return err
	}
	if err := c.SetRegs(s.Regs); err != nil {
		return err
	}
	// MSRs after the special registers: KVM checks canonical addresses
	// (KERNEL_GS_BASE, LSTAR, ...) against the vCPU's CR4, and a guest
	// with 5-level paging (LA57) has addresses 4-level paging rejects.
	// MSR_IA32_TSC_DEADLINE is ignored unless the LAPIC timer is in
	// TSC-deadline mode: set it after the LAPIC, or a restored guest's
	// pending timer never fires (and an idle guest never wakes).
	var msrs, late []kvm.MSREntry
	for _, m := range s.MSRs {
		if m.Index == msrTSCDeadline {
			late = append(late, m)
		} else {
			msrs = append(msrs, m)
		}
	}
	if err := c.SetMSRs(msrs); err != nil {
		return fmt.Errorf("vcpu %d: %w", c.ID, err)
	}
	if err := c.SetXSave(s.XSave); err != nil {
		return err
	}
	if err := c.SetXCRs(s.XCRs); err != nil {
		return err
	}
	if err := c.SetDebugRegs(s.Debug); err != nil {
		return err
	}
	if err := c.SetLAPIC(s.LAPIC); err != nil {
		return err
	}
	if err := c.SetMSRs(late); err != nil {
		return fmt.Errorf("vcpu %d: %w", c.ID, err)
	}
	if err := c.SetMPState(s.MP); err != nil {
		return err
	}
	return c.SetVCPUEvents(s.Events)
}

// Options control Take.
type Options struct {
	// Resume lets the VM run on after the snapshot (fork); otherwise it
	// stays paused (pause: the caller stops it and exits).
	Resume bool
	// Diff writes only the pages changed since the VM was restored, as a
	// new layer over the snapshot it came from (see TakeDiff).
	Labels map[string]string
}

// Take pauses v (if running) and its devices, writes a full snapshot to
// dir (state file and memory file) and then resumes it or leaves it
// paused. dir is created; existing files there are replaced atomically.
func Take(v *vm.VM, dir string, o Options) (*State, error) {
	s, done, err := captureQuiesced(v, o)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, errs.Wrap(errs.Internal, err, "snapshot dir %s: %v", dir, err)
	}
	if err := writeMemory(filepath.Join(dir, MemoryFile), v.Mem.Host(), nil); err != nil {
		return nil, err
	}
	if err := writeState(dir, s); err != nil {
		return nil, err
	}
	return s, nil
}

// captureQuiesced quiesces v (see quiesce) and captures its state, stamped
// with the time and o's labels; done ends the quiescence as o asks.
func captureQuiesced(v *vm.VM, o Options) (s *State, done func(), err error) {
	resume, err := quiesce(v)
	if err != nil {
		return nil, nil, err
	}
	done = func() { resume(o.Resume) }
	if s, err = Capture(v); err != nil {
		done()
		return nil, nil, err
	}
	s.Meta.Created = time.Now().UTC().Format(time.RFC3339Nano)
	s.Meta.Labels = o.Labels
	return s, done, nil
}

// quiesce pauses the vCPUs and devices; the returned func undoes it.
func quiesce(v *vm.VM) (func(vcpus bool), error) {
	wasRunning := v.State() == vm.StateRunning
	if wasRunning {
		if err := v.Pause(); err != nil {
			return nil, errs.Wrap(errs.Internal, err, "snapshot: pause")
		}
	}
	var qs []Quiescer
	for _, d := range v.Devices() {
		if q, ok := d.Dev.(Quiescer); ok {
			q.Pause()
			qs = append(qs, q)
		}
	}
	// Devices always go back to work once the snapshot is written (a
	// paused VM may be resumed later with a plain VM resume); the vCPUs
	// only when asked.
	return func(vcpus bool) {
		for _, q := range qs {
			q.Resume()
		}
		if wasRunning && vcpus {
			_ = v.Resume()
		}
	}, nil
}

func writeState(dir string, s *State) error {
	b, err := s.Encode()
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, StateFile), b)
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "write %s: %v", path, err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "write %s: %v", path, err)
	}
	return nil
}

const pageSize = 4096

func zeroPage(p []byte) bool {
	for i := 0; i < len(p); i += 8 {
		if p[i]|p[i+1]|p[i+2]|p[i+3]|p[i+4]|p[i+5]|p[i+6]|p[i+7] != 0 {
			return false
		}
	}
	return true
}

// writeMemory writes mem to path as a sparse file of len(mem) bytes.
// With runs nil every non-zero page is written; otherwise only the pages
// of runs (zero pages included: they may hide data below).
func writeMemory(path string, mem []byte, runs []Run) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "memory file %s: %v", path, err)
	}
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "write memory file %s: %v", path, err)
	}
	if err := f.Truncate(int64(len(mem))); err != nil {
		return fail(err)
	}
	fd := int(f.Fd())
	put := func(off, end int) error {
		for off < end {
			n, err := unix.Pwrite(fd, mem[off:end], int64(off))
			if err != nil {
				return err
			}
			off += n
		}
		return nil
	}
	if runs == nil {
		start := -1
		for off := 0; off < len(mem); off += pageSize {
			if zeroPage(mem[off : off+pageSize]) {
				if start >= 0 {
					if err := put(start, off); err != nil {
						return fail(err)
					}
					start = -1
				}
			} else if start < 0 {
				start = off
			}
		}
		if start >= 0 {
			if err := put(start, len(mem)); err != nil {
				return fail(err)
			}
		}
	} else {
		for _, r := range runs {
			if err := put(int(r.Page*pageSize), int((r.Page+r.Count)*pageSize)); err != nil {
				return fail(err)
			}
		}
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "memory file %s: %v", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "memory file %s: %v", path, err)
	}
	return nil
}

// Load reads and verifies dir's state file and checks that its memory
// files exist with the right sizes. Nothing is mapped yet.
func Load(dir string) (*State, error) {
	p := filepath.Join(dir, StateFile)
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errs.E(errs.NotFound, "no snapshot at %s", dir)
		}
		return nil, errs.Wrap(errs.Internal, err, "snapshot")
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "snapshot")
	}
	if st.Size() > MaxFileSize {
		return nil, corrupt("%s is %d bytes, limit %d", p, st.Size(), MaxFileSize)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, errs.Wrap(errs.Internal, err, "read %s", p)
	}
	s, err := Decode(b)
	if err != nil {
		return nil, err
	}
	files := []string{s.Meta.MemFile}
	for _, l := range s.Meta.Layers {
		files = append(files, l.File)
	}
	for _, name := range files {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return nil, errs.Wrap(errs.FailedPrecondition, err, "snapshot memory file %s", name)
		}
		if uint64(fi.Size()) != s.Meta.MemSize {
			return nil, corrupt("memory file %s is %d bytes, guest RAM is %d", name, fi.Size(), s.Meta.MemSize)
		}
	}
	return s, nil
}

// Restore builds a machine from spec (memory and restore fields are set
// here) with RAM mapped MAP_PRIVATE from the snapshot in dir and loads
// its state. The machine is not started. On error nothing is left
// behind.
func Restore(dir string, spec machine.Spec) (*machine.Machine, *State, error) {
	s, err := Load(dir)
	if err != nil {
		return nil, nil, err
	}
	m, err := RestoreState(dir, s, spec)
	return m, s, err
}

// RestoreState is Restore with the state already loaded (pools keep the
// decoded state of a template in memory).
func RestoreState(dir string, s *State, spec machine.Spec) (*machine.Machine, error) {
	m, err := Prepare(dir, s, spec)
	if err != nil {
		return nil, err
	}
	if err := Apply(m.VM, s); err != nil {
		m.VM.Close()
		return nil, err
	}
	return m, nil
}

// Prepare does every step of a restore that does not depend on the
// snapshot's CPU and device state: create the KVM VM, irqchip, PIT and
// vCPUs, map guest memory (and layers) MAP_PRIVATE, attach the devices.
// A pre-started VMM prepares ahead of time (these steps wait for kernel
// RCU grace periods and cost milliseconds on a busy host); Apply and
// Start are then all a restore request has left to do.
func Prepare(dir string, s *State, spec machine.Spec) (*machine.Machine, error) {
	spec.MemSize = s.Meta.MemSize
	spec.VCPUs = s.Meta.VCPUs
	spec.MemMode = vm.MemFilePrivate
	spec.MemFile = filepath.Join(dir, s.Meta.MemFile)
	spec.Restore = true
	spec.Kernel = nil
	m, err := machine.New(spec)
	if err != nil {
		return nil, err
	}
	if err := mapLayers(m.VM.Mem, dir, s.Meta.Layers); err != nil {
		m.VM.Close()
		return nil, err
	}
	if err := s.Check(m.VM); err != nil {
		m.VM.Close()
		return nil, err
	}
	return m, nil
}

// mapLayers maps the runs of each diff layer over the base mapping
// (MAP_PRIVATE|MAP_FIXED at the same host address, so KVM's memslots
// stay valid).
func mapLayers(mem *vm.Memory, dir string, layers []Layer) error {
	host := mem.Host()
	for _, l := range layers {
		f, err := os.Open(filepath.Join(dir, l.File))
		if err != nil {
			return errs.Wrap(errs.FailedPrecondition, err, "snapshot layer")
		}
		for _, r := range l.Runs {
			off := r.Page * pageSize
			n := r.Count * pageSize
			if off+n > uint64(len(host)) {
				f.Close()
				return corrupt("layer %s run %+v outside guest RAM", l.File, r)
			}
			if _, err := mmapFixed(host[off:off+n], int(f.Fd()), int64(off)); err != nil {
				f.Close()
				return errs.Wrap(errs.Internal, err, "map layer %s", l.File)
			}
		}
		f.Close()
	}
	return nil
}
