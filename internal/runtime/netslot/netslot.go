//go:build linux

// Package netslot puts sandboxes into network slots: Wrap decorates a
// runtime.Runtime (gvisor or microvm) so that every sandbox runs in a slot
// of an internal/network Manager, with its egress policy.
//
//   - Create acquires a slot (from the manager's pool), applies the policy
//     given with CreateWithPolicy (Create: the default policy), fills
//     CreateSpec.Net and calls the inner runtime; a failed Create releases
//     the slot.
//   - Pause keeps the slot (and its policy); Resume restores the sandbox in
//     the same slot (PrepareGuest first: runsc keeps eth0's address when it
//     exits). The NetSlot argument of Resume is ignored.
//   - With Options.InnerSlots the runtime acquires slots itself (gVisor's
//     warm pool in slots): the wrapper applies the policy to the slot
//     Create returns and to the new slot after each Resume.
//   - Destroy destroys the sandbox, then releases the slot.
//   - Dial goes through Manager.Dial (a socket in the slot's router
//     namespace); nothing listens on the host for a sandbox port.
//   - SetPolicy changes a live sandbox's policy (running or paused).
//   - Wrap re-adopts the slots of sandboxes that survived a restart (the
//     inner runtime's List, the policy stored in stateDir) and reaps the rest.
//   - A sandbox created with spec.Net already set is the caller's: every
//     call for it passes through to the inner runtime.
//
// The sandbox -> slot mapping and policy are kept in stateDir/<id>.json.
package netslot

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
)

// Options configure Wrap.
type Options struct {
	// StateDir keeps the sandbox -> slot mapping and policies
	// (<dataDir>/netslot).
	StateDir string
	Logger   *slog.Logger
	// InnerSlots says that the inner runtime acquires and releases slots
	// from the same manager itself (gvisor.Options.Slots: its warm pool
	// pre-restores sandboxes in slots). The wrapper then only applies and
	// keeps policies: on the slot Create returns, again on the new slot
	// after each Resume, and at re-adoption.
	InnerSlots bool
}

// Runtime is a runtime.Runtime whose sandboxes run in network slots.
type Runtime struct {
	runtime.Runtime // the inner runtime: methods not overridden pass through
	mgr             *network.Manager
	dir             string
	log             *slog.Logger
	innerSlots      bool

	mu    sync.Mutex
	boxes map[string]*box
}

var _ runtime.Runtime = (*Runtime)(nil)

// box is a sandbox this wrapper knows. mu serialises its lifecycle calls.
type box struct {
	mu   sync.Mutex
	rec  record
	gone bool
}

// record is what stateDir/<id>.json holds.
type record struct {
	ID     string          `json:"id"`
	Slot   runtime.NetSlot `json:"slot"`
	Policy network.Policy  `json:"policy"`
	Paused bool            `json:"paused,omitempty"`
}

// idRE bounds the ids used as file names (runtimes enforce their own rules).
var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Wrap returns inner with network slots from mgr. It re-adopts
// the slots of inner's surviving sandboxes (inner.List) and then reaps
// every other slot a previous run left behind; sandboxes whose slot is gone
// keep running but are unreachable (their Dial reports NotFound) until
// destroyed. The gvisor runtime needs a manager in netns mode, microvm one
// in tap mode.
func Wrap(ctx context.Context, inner runtime.Runtime, mgr *network.Manager, o Options) (*Runtime, error) {
	log, stateDir := o.Logger, o.StateDir
	if stateDir == "" {
		return nil, errs.E(errs.InvalidArgument, "netslot: no state dir")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	want := network.ModeTap
	if inner.Name() == "gvisor" {
		want = network.ModeNetns
	}
	if mgr.Mode() != want {
		return nil, errs.E(errs.FailedPrecondition, "netslot: the %s runtime needs slots in %s mode, the network manager is in %s mode",
			inner.Name(), want, mgr.Mode())
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, errs.Wrap(errs.Internal, err, "netslot: state dir")
	}
	r := &Runtime{Runtime: inner, mgr: mgr, dir: stateDir, log: log.With("component", "netslot"), boxes: map[string]*box{},
		innerSlots: o.InnerSlots}
	if err := r.adopt(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// adopt matches the records on disk with the inner runtime's sandboxes.
func (r *Runtime) adopt(ctx context.Context) error {
	list, err := r.Runtime.List(ctx)
	if err != nil {
		return errs.Wrap(errs.KindOf(err), err, "netslot: list sandboxes")
	}
	alive := map[string]runtime.Info{}
	for _, i := range list {
		alive[i.ID] = i
	}
	ents, _ := os.ReadDir(r.dir)
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		p := filepath.Join(r.dir, name)
		var rec record
		b, err := os.ReadFile(p)
		if err == nil {
			err = json.Unmarshal(b, &rec)
		}
		info, ok := alive[rec.ID]
		if err != nil || !ok || rec.ID+".json" != name {
			// The sandbox is gone (or the record is unreadable): its slot
			// is reaped below with the other orphans.
			os.Remove(p)
			continue
		}
		if info.Net.ID != "" || r.innerSlots {
			rec.Slot = info.Net // the runtime's own view wins
		}
		rec.Paused = info.State == runtime.StatePaused
		if rec.Slot.ID == "" && r.innerSlots && rec.Paused {
			r.boxes[rec.ID] = &box{rec: rec} // no slot while paused
			continue
		}
		if err := r.mgr.Adopt(ctx, rec.Slot, rec.Policy); err != nil {
			r.log.Warn("sandbox survived the restart, its network slot did not", "sandbox", rec.ID, "slot", rec.Slot.ID, "err", err)
			os.Remove(p) // calls for it pass through to the runtime
			continue
		}
		r.boxes[rec.ID] = &box{rec: rec}
		r.log.Info("re-adopted network slot", "sandbox", rec.ID, "slot", rec.Slot.ID)
	}
	if n := r.mgr.ReapStale(); n > 0 {
		r.log.Info("removed network slots of a previous run", "count", n)
	}
	return nil
}

func (r *Runtime) path(id string) string { return filepath.Join(r.dir, id+".json") }

func (r *Runtime) save(rec record) error {
	b, _ := json.Marshal(rec)
	tmp := r.path(rec.ID) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return errs.Wrap(errs.Internal, err, "netslot: save %s", rec.ID)
	}
	if err := os.Rename(tmp, r.path(rec.ID)); err != nil {
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "netslot: save %s", rec.ID)
	}
	return nil
}

// get returns the live box of id, locked.
func (r *Runtime) get(id string) (*box, error) {
	r.mu.Lock()
	b, ok := r.boxes[id]
	r.mu.Unlock()
	if !ok {
		return nil, errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	b.mu.Lock()
	if b.gone {
		b.mu.Unlock()
		return nil, errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	return b, nil
}

// Create implements runtime.Runtime: CreateWithPolicy with the default
// policy (internet allowed).
func (r *Runtime) Create(ctx context.Context, spec runtime.CreateSpec) (runtime.Info, error) {
	return r.CreateWithPolicy(ctx, spec, network.Policy{})
}

// CreateWithPolicy creates a sandbox in a fresh slot whose egress policy
// is p from the first packet, and fills in spec.Net. Bad policies are
// InvalidArgument before anything happens.
//
// A spec that already carries a slot (spec.Net.NetnsPath set: the caller
// manages slots itself) is passed to the inner runtime untouched, and so
// are all later calls for that sandbox; p must then be the zero Policy.
func (r *Runtime) CreateWithPolicy(ctx context.Context, spec runtime.CreateSpec, p network.Policy) (runtime.Info, error) {
	if !idRE.MatchString(spec.ID) {
		return runtime.Info{}, errs.E(errs.InvalidArgument, "bad sandbox id %q", spec.ID)
	}
	if err := network.ValidatePolicy(p); err != nil {
		return runtime.Info{}, err
	}
	if spec.Net.NetnsPath != "" {
		if !reflect.DeepEqual(p, network.Policy{}) {
			return runtime.Info{}, errs.E(errs.InvalidArgument, "sandbox %s: a policy cannot be set on a slot the caller manages", spec.ID)
		}
		r.mu.Lock()
		_, dup := r.boxes[spec.ID]
		r.mu.Unlock()
		if dup {
			return runtime.Info{}, errs.E(errs.AlreadyExists, "sandbox %s already exists", spec.ID)
		}
		return r.Runtime.Create(ctx, spec)
	}
	b := &box{}
	b.mu.Lock()
	defer b.mu.Unlock()
	r.mu.Lock()
	if _, ok := r.boxes[spec.ID]; ok {
		r.mu.Unlock()
		return runtime.Info{}, errs.E(errs.AlreadyExists, "sandbox %s already exists", spec.ID)
	}
	r.boxes[spec.ID] = b // reserved; removed on failure
	r.mu.Unlock()
	slot := runtime.NetSlot{}
	fail := func(err error) (runtime.Info, error) {
		if slot.ID != "" {
			if rerr := r.mgr.Release(context.WithoutCancel(ctx), slot.ID); rerr != nil {
				r.log.Warn("release slot after failed create", "slot", slot.ID, "err", rerr)
			}
		}
		os.Remove(r.path(spec.ID))
		b.gone = true
		r.mu.Lock()
		delete(r.boxes, spec.ID)
		r.mu.Unlock()
		return runtime.Info{}, err
	}
	if r.innerSlots {
		return r.createInner(ctx, b, spec, p, fail)
	}
	var err error
	if slot, err = r.mgr.Acquire(ctx); err != nil {
		return fail(err)
	}
	if err := r.mgr.SetPolicy(slot.ID, p); err != nil {
		return fail(err)
	}
	b.rec = record{ID: spec.ID, Slot: slot, Policy: p}
	// Saved before the sandbox exists: after a crash in between, the record
	// has no sandbox and the slot is reaped.
	if err := r.save(b.rec); err != nil {
		return fail(err)
	}
	spec.Net = slot
	info, err := r.Runtime.Create(ctx, spec)
	if err != nil {
		return fail(err)
	}
	return info, nil
}

// createInner is Create when the inner runtime acquires the slot.
func (r *Runtime) createInner(ctx context.Context, b *box, spec runtime.CreateSpec, p network.Policy, fail func(error) (runtime.Info, error)) (runtime.Info, error) {
	b.rec = record{ID: spec.ID, Policy: p}
	if err := r.save(b.rec); err != nil {
		return fail(err)
	}
	info, err := r.Runtime.Create(ctx, spec)
	if err != nil {
		return fail(err)
	}
	if info.Net.ID == "" {
		err = errs.E(errs.FailedPrecondition, "netslot: the %s runtime gave sandbox %s no network slot (InnerSlots without a slot provider?)", r.Runtime.Name(), spec.ID)
	} else {
		err = r.mgr.SetPolicy(info.Net.ID, p)
	}
	if err != nil {
		r.Runtime.Destroy(context.WithoutCancel(ctx), spec.ID)
		return fail(err)
	}
	b.rec.Slot = info.Net
	if err := r.save(b.rec); err != nil {
		r.Runtime.Destroy(context.WithoutCancel(ctx), spec.ID)
		return fail(err)
	}
	return info, nil
}

// SetPolicy changes sandbox id's egress policy; live connections follow at
// their next packet. InvalidArgument (nothing changed) for a bad policy.
func (r *Runtime) SetPolicy(id string, p network.Policy) error {
	if err := network.ValidatePolicy(p); err != nil {
		return err
	}
	b, err := r.get(id)
	if err != nil {
		return err
	}
	defer b.mu.Unlock()
	if b.rec.Slot.ID != "" { // none: paused with InnerSlots, applied at Resume
		if err := r.mgr.SetPolicy(b.rec.Slot.ID, p); err != nil {
			return err
		}
	}
	b.rec.Policy = p
	return r.save(b.rec)
}

// Policy returns sandbox id's current egress policy.
func (r *Runtime) Policy(id string) (network.Policy, error) {
	b, err := r.get(id)
	if err != nil {
		return network.Policy{}, err
	}
	defer b.mu.Unlock()
	return b.rec.Policy, nil
}

// Slot returns the network slot of sandbox id.
func (r *Runtime) Slot(id string) (runtime.NetSlot, error) {
	b, err := r.get(id)
	if err != nil {
		return runtime.NetSlot{}, err
	}
	defer b.mu.Unlock()
	return b.rec.Slot, nil
}

// Pause implements runtime.Runtime; the sandbox keeps its slot.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	b, err := r.get(id)
	if err != nil {
		return r.Runtime.Pause(ctx, id) // the inner runtime's error (NotFound)
	}
	defer b.mu.Unlock()
	if err := r.Runtime.Pause(ctx, id); err != nil {
		return err
	}
	if r.innerSlots {
		b.rec.Slot = runtime.NetSlot{} // released by the runtime
	}
	b.rec.Paused = true
	return r.save(b.rec)
}

// Resume implements runtime.Runtime: the sandbox comes back in its own
// slot; net is ignored (passed on for sandboxes the wrapper does not manage).
func (r *Runtime) Resume(ctx context.Context, id string, net runtime.NetSlot) (runtime.Info, error) {
	b, err := r.get(id)
	if err != nil {
		return r.Runtime.Resume(ctx, id, net)
	}
	defer b.mu.Unlock()
	if r.innerSlots {
		return r.resumeInner(ctx, b)
	}
	if b.rec.Paused {
		// runsc left the guest side without its address when it exited.
		if err := r.mgr.PrepareGuest(b.rec.Slot.ID); err != nil {
			return runtime.Info{}, err
		}
	}
	info, err := r.Runtime.Resume(ctx, id, b.rec.Slot)
	if err != nil {
		return info, err
	}
	b.rec.Paused = false
	return info, r.save(b.rec)
}

// resumeInner is Resume when the runtime acquires a (new) slot: the policy
// follows the sandbox to it. If it cannot be applied, the sandbox is paused
// again rather than left running without its policy.
func (r *Runtime) resumeInner(ctx context.Context, b *box) (runtime.Info, error) {
	info, err := r.Runtime.Resume(ctx, b.rec.ID, runtime.NetSlot{})
	if err != nil {
		return info, err
	}
	if info.Net.ID == "" {
		err = errs.E(errs.FailedPrecondition, "netslot: the %s runtime resumed sandbox %s without a network slot", r.Runtime.Name(), b.rec.ID)
	} else {
		err = r.mgr.SetPolicy(info.Net.ID, b.rec.Policy)
	}
	if err != nil {
		if perr := r.Runtime.Pause(context.WithoutCancel(ctx), b.rec.ID); perr != nil {
			r.log.Error("sandbox resumed without its network policy and could not be paused again", "sandbox", b.rec.ID, "err", perr)
			r.Runtime.Destroy(context.WithoutCancel(ctx), b.rec.ID)
		}
		return runtime.Info{}, err
	}
	b.rec.Slot, b.rec.Paused = info.Net, false
	return info, r.save(b.rec)
}

// Destroy implements runtime.Runtime: the sandbox, then its slot.
func (r *Runtime) Destroy(ctx context.Context, id string) error {
	b, err := r.get(id)
	if err != nil {
		return r.Runtime.Destroy(ctx, id)
	}
	defer b.mu.Unlock()
	if err := r.Runtime.Destroy(ctx, id); err != nil {
		return err
	}
	b.gone = true
	r.mu.Lock()
	delete(r.boxes, id)
	r.mu.Unlock()
	if r.innerSlots || b.rec.Slot.ID == "" {
		// released by the runtime
	} else if err := r.mgr.Release(context.WithoutCancel(ctx), b.rec.Slot.ID); err != nil && !errs.Is(err, errs.NotFound) {
		r.log.Warn("release slot", "sandbox", id, "slot", b.rec.Slot.ID, "err", err)
	}
	os.Remove(r.path(id))
	return nil
}

// Dial implements runtime.Runtime through the slot (Manager.Dial); the
// inner runtime's Dial for sandboxes the wrapper does not manage.
func (r *Runtime) Dial(ctx context.Context, id string, port int) (net.Conn, error) {
	if port < 1 || port > 65535 {
		return nil, errs.E(errs.InvalidArgument, "port %d out of range", port)
	}
	b, err := r.get(id)
	if err != nil {
		return r.Runtime.Dial(ctx, id, port)
	}
	slot, paused := b.rec.Slot.ID, b.rec.Paused
	b.mu.Unlock()
	if paused {
		return nil, errs.E(errs.Conflict, "sandbox %s is paused, not running", id)
	}
	return r.mgr.Dial(ctx, slot, port)
}

// ListSnapshots passes runtime.SnapshotLister through to the inner
// runtime (Unimplemented when it cannot list its snapshots).
func (r *Runtime) ListSnapshots(ctx context.Context) ([]runtime.SnapshotEntry, error) {
	if sl, ok := r.Runtime.(runtime.SnapshotLister); ok {
		return sl.ListSnapshots(ctx)
	}
	return nil, errs.E(errs.Unimplemented, "runtime %s does not list its snapshots", r.Runtime.Name())
}

// Close closes the inner runtime and then the manager: sandboxes keep
// running and their slots stay in place for the next process to adopt.
func (r *Runtime) Close() error {
	err := r.Runtime.Close()
	if merr := r.mgr.Close(); err == nil {
		err = merr
	}
	return err
}
