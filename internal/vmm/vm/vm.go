//go:build linux

// Package vm is the VMM core: one KVM VM with its guest memory, port-I/O
// and MMIO buses, in-kernel irqchip and PIT, and one locked OS thread per
// vCPU. It runs, pauses, resumes and stops the vCPUs, classifies why a
// guest stopped (stopped on request, shut down or reset by the guest,
// crashed) and counts exits. Devices attach through the interfaces of
// package devices; the VM implements devices.GuestMemory (Memory) and
// devices.IRQLine (IRQ, an irqfd on the in-kernel irqchip).
package vm

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/cpu"
	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// Config describes a VM.
type Config struct {
	MemSize uint64     // guest RAM in bytes
	VCPUs   int        // number of vCPUs (1..MaxVCPUs)
	MemMode MemoryMode // how RAM is backed
	MemFile string     // memory file for the file modes
	KVMPath string     // default /dev/kvm
	KVMFD   int        // >0: an open /dev/kvm fd to use (adopted)
	Log     *slog.Logger
}

// MaxVCPUs bounds Config.VCPUs (MP table and APIC id space we lay out).
const MaxVCPUs = 64

// State is the VM's run state.
type State int32

// VM states.
const (
	StateCreated State = iota
	StateRunning
	StatePaused
	StateStopped
)

func (s State) String() string {
	switch s {
	case StateCreated:
		return "created"
	case StateRunning:
		return "running"
	case StatePaused:
		return "paused"
	case StateStopped:
		return "stopped"
	}
	return "unknown"
}

// Outcome says why a VM stopped.
type Outcome string

// Outcomes.
const (
	OutcomeStopped  Outcome = "stopped"  // the host asked (Stop)
	OutcomeShutdown Outcome = "shutdown" // the guest powered off or reset (i8042, system event)
	OutcomeHalted   Outcome = "halted"   // a vCPU executed HLT with nothing to wake it
	OutcomeCrashed  Outcome = "crashed"  // triple fault, internal error, failed entry, unhandled exit
)

// Result is the final state of a stopped VM.
type Result struct {
	Outcome Outcome `json:"outcome"`
	Reason  string  `json:"reason"`
	VCPU    int     `json:"vcpu"`
	RIP     uint64  `json:"rip"`
}

// VM is one microVM.
type VM struct {
	cfg  Config
	log  *slog.Logger
	sys  *kvm.System
	KVM  *kvm.VM
	Mem  *Memory
	CPUs []*VCPU
	PIO  Bus
	MMIO Bus

	devMu   sync.Mutex
	devs    []NamedDevice
	irqs    map[uint32]*IRQ
	closers []func() error

	mu       sync.Mutex
	cond     *sync.Cond
	state    State
	req      atomic.Int32 // reqPause | reqStop bits: fast-path check in the vCPU loop
	parked   int
	live     int
	done     chan struct{}
	result   Result
	finished bool

	Metrics Metrics
}

const (
	reqPause = 1
	reqStop  = 2
)

// NamedDevice is a device attached to the VM, kept for snapshots.
type NamedDevice struct {
	Name string
	Dev  any
}

// VCPU is one vCPU of a VM.
type VCPU struct {
	*kvm.VCPU
	vm  *VM
	tid atomic.Int32
}

// New creates the VM: KVM VM, irqchip and PIT, guest memory and vCPUs
// with CPUID, MSRs and LAPIC set up. Nothing runs until Start.
func New(cfg Config) (_ *VM, err error) {
	if cfg.VCPUs < 1 || cfg.VCPUs > MaxVCPUs {
		return nil, fmt.Errorf("vcpus %d: must be 1..%d", cfg.VCPUs, MaxVCPUs)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	v := &VM{cfg: cfg, log: cfg.Log, irqs: map[uint32]*IRQ{}, done: make(chan struct{})}
	v.cond = sync.NewCond(&v.mu)
	v.Metrics.init()
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	if cfg.KVMFD > 0 {
		v.sys, err = kvm.FromFD(cfg.KVMFD)
	} else {
		v.sys, err = kvm.Open(cfg.KVMPath)
	}
	if err != nil {
		return nil, err
	}
	if v.KVM, err = v.sys.CreateVM(); err != nil {
		return nil, err
	}
	// VT-x needs these two regions; other backends accept or ignore them.
	if v.sys.CheckExtension(kvm.CapSetTSSAddr) > 0 {
		if err := v.KVM.SetTSSAddr(0xfffbd000); err != nil {
			v.log.Debug("set tss addr", "err", err)
		}
	}
	if v.sys.CheckExtension(kvm.CapSetIdentityMap) > 0 {
		if err := v.KVM.SetIdentityMapAddr(0xfffbc000); err != nil {
			v.log.Debug("set identity map addr", "err", err)
		}
	}
	if err = v.KVM.CreateIRQChip(); err != nil {
		return nil, err
	}
	if err = v.KVM.CreatePIT2(kvm.PITSpeakerDummy); err != nil {
		return nil, err
	}
	if v.Mem, err = NewMemory(cfg.MemSize, cfg.MemMode, cfg.MemFile); err != nil {
		return nil, err
	}
	host := v.Mem.Host()
	var off uint64
	for i, r := range boot.RAMRanges(cfg.MemSize) {
		hva := uintptr(unsafePointer(host[off:]))
		if err = v.KVM.SetUserMemoryRegion(uint32(i), 0, r[0], r[1], hva); err != nil {
			return nil, err
		}
		off += r[1]
	}
	supported, err := v.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	tscDeadline := v.sys.CheckExtension(kvm.CapTSCDeadline) > 0
	for i := 0; i < cfg.VCPUs; i++ {
		c, err := v.KVM.CreateVCPU(i)
		if err != nil {
			return nil, err
		}
		v.CPUs = append(v.CPUs, &VCPU{VCPU: c, vm: v})
		if err := cpu.Setup(c, supported, cfg.VCPUs, tscDeadline); err != nil {
			return nil, fmt.Errorf("vcpu %d: %w", i, err)
		}
	}
	return v, nil
}

// System returns the /dev/kvm handle.
func (v *VM) System() *kvm.System { return v.sys }

// AddDevice records a device for snapshots and metrics; the caller
// registers its bus ranges itself.
func (v *VM) AddDevice(name string, d any) {
	v.devMu.Lock()
	defer v.devMu.Unlock()
	v.devs = append(v.devs, NamedDevice{name, d})
}

// Devices lists attached devices in attach order.
func (v *VM) Devices() []NamedDevice {
	v.devMu.Lock()
	defer v.devMu.Unlock()
	return append([]NamedDevice(nil), v.devs...)
}

// StatefulDevices lists the attached devices with snapshot state.
func (v *VM) StatefulDevices() map[string]devices.Stateful {
	m := map[string]devices.Stateful{}
	for _, d := range v.Devices() {
		if s, ok := d.Dev.(devices.Stateful); ok {
			m[d.Name] = s
		}
	}
	return m
}

// OnClose registers a function run by Close (device back-ends).
func (v *VM) OnClose(f func() error) {
	v.devMu.Lock()
	defer v.devMu.Unlock()
	v.closers = append(v.closers, f)
}

// State returns the current run state.
func (v *VM) State() State {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.state
}

// Start launches one locked OS thread per vCPU.
func (v *VM) Start() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.state != StateCreated {
		return fmt.Errorf("vm is %s, not created", v.state)
	}
	v.state = StateRunning
	v.Metrics.startedAt.Store(time.Now().UnixNano())
	v.live = len(v.CPUs)
	for _, c := range v.CPUs {
		go c.loop()
	}
	return nil
}

// kickAll makes every vCPU leave KVM_RUN: immediate_exit stops a vCPU
// about to enter, the signal interrupts one inside.
func (v *VM) kickAll() {
	pid := unix.Getpid()
	for _, c := range v.CPUs {
		c.SetImmediateExit(true)
		if tid := c.tid.Load(); tid != 0 {
			_ = unix.Tgkill(pid, int(tid), unix.SIGURG)
		}
	}
}

// Pause stops every vCPU outside the guest and returns once all are
// parked (vCPU state can then be read consistently).
func (v *VM) Pause() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch v.state {
	case StatePaused:
		return nil
	case StateRunning:
	default:
		return fmt.Errorf("vm is %s, not running", v.state)
	}
	v.req.Store(v.req.Load() | reqPause)
	v.kickAll()
	deadline := time.AfterFunc(5*time.Second, func() { v.cond.Broadcast() })
	defer deadline.Stop()
	start := time.Now()
	for v.parked < v.live && v.state == StateRunning {
		v.cond.Wait()
		if v.parked < v.live && time.Since(start) > 5*time.Second {
			// Give up and let the parked vCPUs run again: the VM stays
			// running rather than half paused.
			v.req.Store(v.req.Load() &^ reqPause)
			if v.req.Load()&reqStop == 0 {
				for _, c := range v.CPUs {
					c.SetImmediateExit(false)
				}
			}
			v.cond.Broadcast()
			return fmt.Errorf("pause: %d of %d vCPUs did not park", v.live-v.parked, v.live)
		}
	}
	if v.state != StateRunning {
		return fmt.Errorf("vm %s while pausing", v.state)
	}
	v.state = StatePaused
	v.Metrics.Pauses.Add(1)
	return nil
}

// Resume restarts paused vCPUs.
func (v *VM) Resume() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch v.state {
	case StateRunning:
		return nil
	case StatePaused:
	default:
		return fmt.Errorf("vm is %s, not paused", v.state)
	}
	v.req.Store(v.req.Load() &^ reqPause)
	if v.req.Load()&reqStop != 0 {
		return fmt.Errorf("vm is stopping")
	}
	for _, c := range v.CPUs {
		// Tell a kvmclock guest it was paused, so its watchdogs do not
		// report a soft lockup (EINVAL when the guest has no kvmclock).
		_ = c.KVMClockCtrl()
		c.SetImmediateExit(false)
	}
	v.state = StateRunning
	v.cond.Broadcast()
	return nil
}

// Stop stops the VM (outcome "stopped") and waits for the vCPU threads.
func (v *VM) Stop() Result {
	v.finish(Result{Outcome: OutcomeStopped, Reason: "stop requested", VCPU: -1})
	return v.Wait()
}

// RequestShutdown is how devices (i8042 reset, ...) stop the VM on the
// guest's behalf; it does not wait.
func (v *VM) RequestShutdown(reason string) {
	v.finish(Result{Outcome: OutcomeShutdown, Reason: reason, VCPU: -1})
}

// finish records the first result and tells every vCPU to exit.
func (v *VM) finish(r Result) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.finished {
		return
	}
	v.finished = true
	v.result = r
	v.req.Store(reqStop)
	if v.state == StateCreated {
		v.state = StateStopped
		close(v.done)
		return
	}
	v.kickAll()
	v.cond.Broadcast()
}

// Done is closed when the VM has stopped and every vCPU thread exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// Wait blocks until the VM stops and returns why.
func (v *VM) Wait() Result {
	<-v.done
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.result
}

// Close stops the VM if needed and releases every resource.
func (v *VM) Close() error {
	v.mu.Lock()
	started := v.state != StateCreated
	v.mu.Unlock()
	if started {
		v.Stop()
	}
	v.devMu.Lock()
	closers := v.closers
	v.closers = nil
	v.devMu.Unlock()
	var errsOut []error
	for i := len(closers) - 1; i >= 0; i-- {
		if err := closers[i](); err != nil {
			errsOut = append(errsOut, err)
		}
	}
	for _, irq := range v.irqs {
		unix.Close(irq.efd)
	}
	v.irqs = nil
	for _, c := range v.CPUs {
		c.Close()
	}
	v.CPUs = nil
	if v.KVM != nil {
		v.KVM.Close()
		v.KVM = nil
	}
	if v.Mem != nil {
		v.Mem.Close()
	}
	if v.sys != nil {
		v.sys.Close()
		v.sys = nil
	}
	return errors.Join(errsOut...)
}

// loop is the vCPU thread.
func (c *VCPU) loop() {
	runtime.LockOSThread()
	// The thread is never unlocked: it dies with the goroutine, so no
	// other goroutine inherits its signal/KVM state.
	v := c.vm
	c.tid.Store(int32(unix.Gettid()))
	defer c.exited()
	defer func() {
		// A device model bug must not take the process down silently:
		// stop the VM and report it as a VMM fault.
		if r := recover(); r != nil {
			v.log.Error("panic on vCPU thread", "vcpu", c.ID, "panic", r, "stack", string(debug.Stack()))
			v.finish(Result{Outcome: OutcomeCrashed, Reason: fmt.Sprintf("vmm panic: %v", r), VCPU: c.ID})
		}
	}()
	// A kick sent before tid was stored is covered by immediate_exit,
	// which kickAll sets first.
	for {
		if v.req.Load() != 0 && !c.checkRequests() {
			return
		}
		err := c.Run()
		if err != nil {
			if err == unix.EINTR || err == unix.EAGAIN {
				v.Metrics.count(kvm.ExitIntr)
				continue
			}
			c.crash(fmt.Sprintf("KVM_RUN: %v", err))
			return
		}
		reason := c.ExitReason()
		v.Metrics.count(reason)
		if !c.handleExit(reason) {
			return
		}
	}
}

// checkRequests parks while paused; it returns false when stopping.
func (c *VCPU) checkRequests() bool {
	v := c.vm
	v.mu.Lock()
	defer v.mu.Unlock()
	for v.req.Load()&reqPause != 0 && v.req.Load()&reqStop == 0 {
		v.parked++
		v.cond.Broadcast()
		v.cond.Wait()
		v.parked--
	}
	return v.req.Load()&reqStop == 0
}

func (c *VCPU) exited() {
	v := c.vm
	c.tid.Store(0)
	v.mu.Lock()
	defer v.mu.Unlock()
	v.live--
	if !v.finished {
		// A vCPU left on its own without recording why: treat as crash.
		v.finished = true
		v.result = Result{Outcome: OutcomeCrashed, Reason: "vcpu thread exited", VCPU: c.ID}
		v.req.Store(reqStop)
		v.kickAll()
	}
	v.cond.Broadcast()
	if v.live == 0 {
		v.state = StateStopped
		close(v.done)
	}
}

func (c *VCPU) rip() uint64 {
	r, err := c.GetRegs()
	if err != nil {
		return 0
	}
	return r.RIP
}

func (c *VCPU) crash(reason string) {
	c.vm.log.Warn("guest crashed", "vcpu", c.ID, "reason", reason)
	c.vm.finish(Result{Outcome: OutcomeCrashed, Reason: reason, VCPU: c.ID, RIP: c.rip()})
}

// handleExit services one exit; false ends the vCPU thread.
func (c *VCPU) handleExit(reason uint32) bool {
	v := c.vm
	switch reason {
	case kvm.ExitIO:
		io := c.IOExit()
		if io.Data == nil || !validSize(io.Size) {
			c.crash(fmt.Sprintf("malformed io exit port %#x size %d count %d", io.Port, io.Size, io.Count))
			return false
		}
		for i := 0; i < io.Count; i++ {
			d := io.Data[i*io.Size : (i+1)*io.Size]
			if io.Out {
				v.PIO.Write(uint64(io.Port), d)
			} else {
				v.PIO.Read(uint64(io.Port), d)
			}
		}
		return true
	case kvm.ExitMMIO:
		m := c.MMIOExit()
		if m.Write {
			v.MMIO.Write(m.Addr, m.Data)
		} else {
			v.MMIO.Read(m.Addr, m.Data)
		}
		return true
	case kvm.ExitIntr, kvm.ExitIRQWindowOpen:
		return true
	case kvm.ExitHLT:
		v.finish(Result{Outcome: OutcomeHalted, Reason: "hlt", VCPU: c.ID, RIP: c.rip()})
		return false
	case kvm.ExitShutdown:
		c.crash("triple fault (KVM_EXIT_SHUTDOWN)")
		return false
	case kvm.ExitSystemEvent:
		switch t := c.SystemEventType(); t {
		case kvm.SystemEventShutdown:
			v.finish(Result{Outcome: OutcomeShutdown, Reason: "guest powered off", VCPU: c.ID})
		case kvm.SystemEventReset:
			v.finish(Result{Outcome: OutcomeShutdown, Reason: "guest reset", VCPU: c.ID})
		default:
			c.crash(fmt.Sprintf("system event %d", t))
		}
		return false
	case kvm.ExitFailEntry:
		c.crash(fmt.Sprintf("entry failed, hardware reason %#x", c.FailEntryReason()))
		return false
	case kvm.ExitInternalError:
		sub, data := c.InternalError()
		c.crash(fmt.Sprintf("KVM internal error, suberror %d data %x", sub, data))
		return false
	default:
		c.crash(fmt.Sprintf("unhandled exit %s", kvm.ExitName(reason)))
		return false
	}
}
