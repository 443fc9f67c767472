//go:build linux

package snapshot

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/vm"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// Controller drives one VM for the VMM control socket (vmmapi.Server):
// run control, snapshots, and restores. A Controller created without a
// machine is a pre-started VMM: the process is up, /dev/kvm open and the
// control socket listening, and POST /restore builds the VM from a
// snapshot, so a sandbox create costs no fork/exec.
type Controller struct {
	// Spec returns the device set for a restore (it must match the one
	// the snapshot was taken with).
	Spec func() machine.Spec
	// Build, if set, builds the device set of a restore request that
	// carries its own back-ends (RestoreRequest.Options); the returned
	// func releases them after the VM is closed.
	Build func(r vmmapi.RestoreRequest) (machine.Spec, func(), error)
	// OnStop is called (once) after the VM was stopped on request.
	OnStop func()
	// BeforeStart, if set, runs once, when the first VM has been built
	// (restored, or attached by a boot) and before it runs a guest
	// instruction: the VMM sets its cgroup limits from the VM's size and
	// installs its seccomp filter there, after every file is open. An
	// error fails the restore (the VM is closed).
	BeforeStart func(m *machine.Machine) error

	mu       sync.Mutex
	m        *machine.Machine
	from     string // snapshot dir the VM was restored from
	base     *State
	cmdline  string
	stopped  sync.Once
	hardened bool

	prepared    *machine.Machine
	preparedDir string
	preparedSt  *State
	cleanups    []func()
}

// Prepare readies a restore of the snapshot in dir (see Prepare): a
// later Restore of the same dir only sets the state and starts.
func (c *Controller) Prepare(dir string) error {
	s, err := loadCached(dir)
	if err != nil {
		return err
	}
	m, err := Prepare(dir, s, c.Spec())
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.prepared != nil {
		c.prepared.VM.Close()
	}
	c.prepared, c.preparedDir, c.preparedSt = m, dir, s
	return nil
}

// Close releases the VM (or the prepared one).
func (c *Controller) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m != nil {
		c.m.VM.Close()
	}
	if c.prepared != nil {
		c.prepared.VM.Close()
		c.prepared = nil
	}
	for _, f := range c.cleanups {
		f()
	}
	c.cleanups = nil
}

var (
	_ vmmapi.Controller  = (*Controller)(nil)
	_ vmmapi.Snapshotter = (*Controller)(nil)
)

// VCPUs serves GET /debug/vcpus.
func (c *Controller) VCPUs() ([]vmmapi.VCPURegs, error) {
	v, err := c.vm()
	if err != nil {
		return nil, err
	}
	return vmmapi.ReadVCPUs(v)
}

// Harden runs BeforeStart once (booted VMs call it before VM.Start).
func (c *Controller) Harden(m *machine.Machine) error {
	c.mu.Lock()
	done := c.hardened
	c.hardened = true
	c.mu.Unlock()
	if done || c.BeforeStart == nil {
		return nil
	}
	if err := c.BeforeStart(m); err != nil {
		return errs.Wrap(errs.FailedPrecondition, err, "harden vmm: %v", err)
	}
	return nil
}

// Attach gives the controller a VM it did not restore itself (booted).
func (c *Controller) Attach(m *machine.Machine) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m = m
	c.cmdline = m.Cmdline
}

// AddCleanup registers f to run on Close (device back-ends).
func (c *Controller) AddCleanup(f func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cleanups = append(c.cleanups, f)
}

// Machine returns the current machine (nil before a restore).
func (c *Controller) Machine() *machine.Machine {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m
}

func (c *Controller) vm() (*vm.VM, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		return nil, errs.E(errs.FailedPrecondition, "no vm yet: restore a snapshot first")
	}
	return c.m.VM, nil
}

// Start starts a VM restored or booted without starting.
func (c *Controller) Start() error {
	v, err := c.vm()
	if err != nil {
		return err
	}
	return wrapState(v.Start())
}

// Pause pauses the vCPUs.
func (c *Controller) Pause() error {
	v, err := c.vm()
	if err != nil {
		return err
	}
	return wrapState(v.Pause())
}

// Resume resumes the vCPUs.
func (c *Controller) Resume() error {
	v, err := c.vm()
	if err != nil {
		return err
	}
	return wrapState(v.Resume())
}

// Stop stops the VM (or, before a restore, just the process).
func (c *Controller) Stop() error {
	if v, err := c.vm(); err == nil {
		v.Stop()
	}
	if c.OnStop != nil {
		c.stopped.Do(c.OnStop)
	}
	return nil
}

func wrapState(err error) error {
	if err != nil {
		return errs.Wrap(errs.Conflict, err, "vm")
	}
	return nil
}

// Status reports the VM state ("created" with no VM in a pre-started
// VMM that has not restored yet).
func (c *Controller) Status() vmmapi.Status {
	s := vmmapi.Status{State: "created", PID: os.Getpid()}
	c.mu.Lock()
	m := c.m
	s.Cmdline = c.cmdline
	c.mu.Unlock()
	if m == nil {
		return s
	}
	s.State = m.VM.State().String()
	if !m.VM.Metrics.StartedAt().IsZero() {
		s.Uptime = time.Since(m.VM.Metrics.StartedAt()).Seconds()
	}
	if s.State == "stopped" {
		r := m.VM.Wait()
		s.Result = &vmmapi.Result{Outcome: string(r.Outcome), Reason: r.Reason, VCPU: r.VCPU, RIP: r.RIP}
	}
	return s
}

// Metrics reports the VM's counters.
func (c *Controller) Metrics() vmmapi.Metrics {
	m := c.Machine()
	if m == nil {
		return vmmapi.Metrics{Snapshot: vm.Snapshot{State: "created"}}
	}
	return vmmapi.Metrics{Snapshot: m.VM.MetricsSnapshot()}
}

// Snapshot writes a snapshot of the running VM (full, or a diff layer
// over the snapshot it was restored from).
func (c *Controller) Snapshot(r vmmapi.SnapshotRequest) (vmmapi.SnapshotReply, error) {
	rep, err := c.snapshot(r)
	return rep, described(err)
}

func (c *Controller) snapshot(r vmmapi.SnapshotRequest) (vmmapi.SnapshotReply, error) {
	v, err := c.vm()
	if err != nil {
		return vmmapi.SnapshotReply{}, err
	}
	if r.Dir == "" {
		return vmmapi.SnapshotReply{}, errs.E(errs.InvalidArgument, "snapshot: dir is required")
	}
	t0 := time.Now()
	var written uint64
	if r.Diff {
		c.mu.Lock()
		from, base := c.from, c.base
		c.mu.Unlock()
		if base == nil {
			return vmmapi.SnapshotReply{}, errs.E(errs.FailedPrecondition, "diff snapshot: this vm was not restored from a snapshot")
		}
		res, err := TakeDiff(v, from, base, r.Dir, Options{Resume: r.Resume})
		if err != nil {
			return vmmapi.SnapshotReply{}, err
		}
		written = res.WrittenBytes
	} else {
		if _, err := Take(v, r.Dir, Options{Resume: r.Resume}); err != nil {
			return vmmapi.SnapshotReply{}, err
		}
		if fi, err := os.Stat(filepath.Join(r.Dir, MemoryFile)); err == nil {
			written = allocated(fi)
		}
	}
	return vmmapi.SnapshotReply{Dir: r.Dir, MemBytes: v.Mem.Size(), WrittenMem: written,
		PauseMillis: float64(time.Since(t0).Microseconds()) / 1000, Status: c.Status()}, nil
}

var stateCache sync.Map // dir -> *cachedState

type cachedState struct {
	mtime time.Time
	size  int64
	s     *State
}

// loadCached decodes a snapshot's state once per process (a pre-started
// VMM may be told to restore the same template repeatedly in tests; in
// production each process restores once, and Load is ~100 us anyway).
func loadCached(dir string) (*State, error) {
	fi, err := os.Stat(filepath.Join(dir, StateFile))
	if err == nil {
		if v, ok := stateCache.Load(dir); ok {
			cs := v.(*cachedState)
			if cs.mtime.Equal(fi.ModTime()) && cs.size == fi.Size() {
				return cs.s, nil
			}
		}
	}
	s, err := Load(dir)
	if err != nil {
		return nil, err
	}
	if fi != nil {
		stateCache.Store(dir, &cachedState{mtime: fi.ModTime(), size: fi.Size(), s: s})
	}
	return s, nil
}

// Restore builds the VM from the snapshot in r.Dir and starts it.
func (c *Controller) Restore(r vmmapi.RestoreRequest) (vmmapi.RestoreReply, error) {
	rep, err := c.restore(r)
	return rep, described(err)
}

// described gives plain errors (KVM ioctls, files) a message: the
// control socket's client is the node, which must see why.
func described(err error) error {
	var e *errs.Error
	if err == nil || errors.As(err, &e) {
		return err
	}
	return errs.Wrap(errs.Internal, err, "%v", err)
}

func (c *Controller) restore(r vmmapi.RestoreRequest) (vmmapi.RestoreReply, error) {
	t0 := time.Now()
	c.mu.Lock()
	if c.m != nil {
		c.mu.Unlock()
		return vmmapi.RestoreReply{}, errs.E(errs.Conflict, "this VMM already runs a vm")
	}
	c.mu.Unlock()
	if r.Options != nil {
		return c.restoreWith(r, t0)
	}
	if c.Spec == nil {
		return vmmapi.RestoreReply{}, errs.E(errs.FailedPrecondition, "this VMM has no device spec for restores")
	}
	c.mu.Lock()
	m, s := c.prepared, c.preparedSt
	if m != nil && c.preparedDir != r.Dir {
		m.VM.Close()
		m = nil
	}
	c.prepared = nil
	c.mu.Unlock()
	if m != nil {
		// Prepared ahead: the state file may have been replaced since.
		if cur, err := loadCached(r.Dir); err != nil || cur != s {
			m.VM.Close()
			m = nil
		}
	}
	if m != nil {
		if err := Apply(m.VM, s); err != nil {
			m.VM.Close()
			return vmmapi.RestoreReply{}, err
		}
	} else {
		var err error
		if s, err = loadCached(r.Dir); err != nil {
			return vmmapi.RestoreReply{}, err
		}
		if m, err = RestoreState(r.Dir, s, c.Spec()); err != nil {
			return vmmapi.RestoreReply{}, err
		}
	}
	if err := c.Harden(m); err != nil {
		m.VM.Close()
		return vmmapi.RestoreReply{}, err
	}
	var err error
	var before uint64
	var word []byte
	if r.WaitWord != 0 {
		if word, err = m.VM.Mem.Slice(r.WaitWord, 8); err != nil {
			m.VM.Close()
			return vmmapi.RestoreReply{}, errs.Wrap(errs.InvalidArgument, err, "wait_word")
		}
		before = binary.LittleEndian.Uint64(word)
	}
	if !r.Paused {
		if err := m.VM.Start(); err != nil {
			m.VM.Close()
			return vmmapi.RestoreReply{}, errs.Wrap(errs.Internal, err, "start restored vm")
		}
	}
	return c.started(r, m, s, word, before, t0)
}

// restoreWith restores with the request's own device back-ends.
func (c *Controller) restoreWith(r vmmapi.RestoreRequest, t0 time.Time) (vmmapi.RestoreReply, error) {
	if c.Build == nil {
		return vmmapi.RestoreReply{}, errs.E(errs.FailedPrecondition, "this VMM cannot build device back-ends")
	}
	c.mu.Lock()
	if c.prepared != nil {
		c.prepared.VM.Close()
		c.prepared = nil
	}
	c.mu.Unlock()
	s, err := loadCached(r.Dir)
	if err != nil {
		return vmmapi.RestoreReply{}, err
	}
	spec, cleanup, err := c.Build(r)
	if err != nil {
		return vmmapi.RestoreReply{}, errs.Wrap(errs.InvalidArgument, err, "restore devices")
	}
	m, err := RestoreState(r.Dir, s, spec)
	if err != nil {
		cleanup()
		return vmmapi.RestoreReply{}, err
	}
	c.mu.Lock()
	c.cleanups = append(c.cleanups, cleanup)
	c.mu.Unlock()
	if err := c.Harden(m); err != nil {
		m.VM.Close()
		return vmmapi.RestoreReply{}, err
	}
	if !r.Paused {
		if err := m.VM.Start(); err != nil {
			m.VM.Close()
			return vmmapi.RestoreReply{}, errs.Wrap(errs.Internal, err, "start restored vm")
		}
	}
	return c.started(r, m, s, nil, 0, t0)
}

func (c *Controller) started(r vmmapi.RestoreRequest, m *machine.Machine, s *State, word []byte, before uint64, t0 time.Time) (vmmapi.RestoreReply, error) {
	c.mu.Lock()
	c.m, c.from, c.base, c.cmdline = m, r.Dir, s, m.Cmdline
	c.mu.Unlock()
	if word != nil && !r.Paused {
		deadline := time.Now().Add(5 * time.Second)
		for binary.LittleEndian.Uint64(word) == before {
			if time.Now().After(deadline) || m.VM.State() == vm.StateStopped {
				return vmmapi.RestoreReply{}, errs.E(errs.Internal, "restored guest did not run (state %s)", m.VM.State())
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	return vmmapi.RestoreReply{Status: c.Status(), RestoreMillis: float64(time.Since(t0).Microseconds()) / 1000}, nil
}
