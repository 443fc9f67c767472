// Package node runs the lifecycle of the sandboxes on one machine: a state
// machine per sandbox, one lock per sandbox, capacity accounting, expiry
// (kill or pause at the end time), and a reconciler that re-adopts or
// cleans up after a crash. It drives a runtime.Runtime and records every
// transition in the store, with an event.
//
// States and transitions (anything else is refused with errs.Conflict):
//
//	creating -> running | failed
//	running  -> pausing | killed
//	pausing  -> paused  | running (pause failed) | failed
//	paused   -> resuming | killed
//	resuming -> running | paused (resume failed) | failed
//	failed   -> killed
//
// Locking: Node.mu guards the maps (cache, locks, active); it is never held
// across a runtime call or a store write. Each sandbox has its own lock
// (lockSandbox), held for the whole of an operation on it, so operations
// on one sandbox are serialised and different sandboxes proceed in
// parallel. Lock order: sandbox lock, then Node.mu.
//
// Capacity: a sandbox holds a slot while creating, running, pausing or
// resuming (paused ones hold none). Slots are reserved under Node.mu before
// the runtime is called, so concurrent creates never exceed Capacity.
package node

import (
	"context"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// Config configures a Node.
type Config struct {
	ID       string // node id ("local" for the all-in-one server)
	Capacity int    // max sandboxes holding a slot
	// RetryAfter is the hint returned when the node is full.
	RetryAfter time.Duration
	// ExpiryInterval is how often expired sandboxes are looked for.
	ExpiryInterval time.Duration
	// OpTimeout bounds one runtime operation (create, pause, resume).
	OpTimeout time.Duration
	// MetricsInterval is how often running sandboxes are sampled for the
	// metrics history (default 5 s); MetricsRetention how long samples are
	// kept (default 1 h).
	MetricsInterval  time.Duration
	MetricsRetention time.Duration
}

// PolicyRuntime is implemented by runtimes that put sandboxes in network
// slots with an egress policy (internal/runtime/netslot).
type PolicyRuntime interface {
	CreateWithPolicy(ctx context.Context, spec runtime.CreateSpec, p network.Policy) (runtime.Info, error)
	SetPolicy(id string, p network.Policy) error
}

// Policy is the egress policy of a sandbox record.
func Policy(allowInternet *bool, nw store.Network) network.Policy {
	return network.Policy{AllowInternetAccess: allowInternet, AllowOut: nw.AllowOut, DenyOut: nw.DenyOut}
}

// Node owns the sandboxes of one machine.
type Node struct {
	cfg Config
	rt  runtime.Runtime
	st  *store.Store
	log *slog.Logger
	now func() time.Time

	mu     sync.Mutex
	cache  map[string]*store.Sandbox // live sandboxes of this node (guarded by mu)
	locks  map[string]*sbLock        // guarded by mu
	active map[string]bool           // ids holding a slot (guarded by mu)

	mmu     sync.Mutex       // guards history (never held with mu)
	history map[string]*ring // metrics samples per live sandbox

	stop chan struct{}
	wg   sync.WaitGroup
}

type sbLock struct {
	mu   sync.Mutex
	refs int
}

// New returns a Node. Call Start to reconcile and run expiry.
func New(cfg Config, rt runtime.Runtime, st *store.Store, log *slog.Logger) *Node {
	if cfg.ID == "" {
		cfg.ID = "local"
	}
	if cfg.Capacity <= 0 {
		cfg.Capacity = 64
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = 5 * time.Second
	}
	if cfg.ExpiryInterval <= 0 {
		cfg.ExpiryInterval = time.Second
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = 2 * time.Minute
	}
	if cfg.MetricsInterval <= 0 {
		cfg.MetricsInterval = 5 * time.Second
	}
	if cfg.MetricsRetention < cfg.MetricsInterval {
		cfg.MetricsRetention = time.Hour
	}
	n := &Node{cfg: cfg, rt: rt, st: st, log: log.With("component", "node", "node", cfg.ID), now: time.Now,
		cache: map[string]*store.Sandbox{}, locks: map[string]*sbLock{}, active: map[string]bool{},
		history: map[string]*ring{}, stop: make(chan struct{})}
	return n
}

// SetClock replaces time.Now (tests).
func (n *Node) SetClock(now func() time.Time) { n.now = now }

// ID returns the node id.
func (n *Node) ID() string { return n.cfg.ID }

// Runtime returns the node's runtime.
func (n *Node) Runtime() runtime.Runtime { return n.rt }

// Capacity returns the number of slots.
func (n *Node) Capacity() int { return n.cfg.Capacity }

// Free returns the number of free slots.
func (n *Node) Free() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cfg.Capacity - len(n.active)
}

// Start reconciles the store with the runtime, sweeps leftover snapshots
// (SweepSnapshots) and starts the expiry and metrics loops.
func (n *Node) Start(ctx context.Context) error {
	if err := n.Reconcile(ctx); err != nil {
		return err
	}
	if _, err := n.SweepSnapshots(ctx); err != nil {
		n.log.Warn("sweep of leftover snapshots failed", "err", err)
	}
	n.st.PutNode(ctx, &store.Node{ID: n.cfg.ID, Address: "local", Runtime: n.rt.Name(), Capacity: n.cfg.Capacity, State: "ready", HeartbeatAt: n.now()})
	n.wg.Add(2)
	go n.expiryLoop()
	go n.metricsLoop()
	return nil
}

// Stop ends the background loops. Sandboxes keep running.
func (n *Node) Stop() {
	select {
	case <-n.stop:
	default:
		close(n.stop)
	}
	n.wg.Wait()
}

func (n *Node) lockSandbox(id string) func() {
	n.mu.Lock()
	l := n.locks[id]
	if l == nil {
		l = &sbLock{}
		n.locks[id] = l
	}
	l.refs++
	n.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		n.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(n.locks, id)
		}
		n.mu.Unlock()
	}
}

// reserve takes a slot for id; ResourceExhausted when the node is full.
func (n *Node) reserve(id string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.active[id] {
		return nil
	}
	if len(n.active) >= n.cfg.Capacity {
		return &errs.Error{Kind: errs.ResourceExhausted, RetryAfter: n.cfg.RetryAfter,
			Msg: "node is at capacity, retry later"}
	}
	n.active[id] = true
	return nil
}

func (n *Node) release(id string) {
	n.mu.Lock()
	delete(n.active, id)
	n.mu.Unlock()
}

// Get returns a copy of the live sandbox id on this node.
func (n *Node) Get(id string) (*store.Sandbox, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	sb, ok := n.cache[id]
	if !ok {
		return nil, errs.E(errs.NotFound, "sandbox %q not found", id)
	}
	c := *sb
	return &c, nil
}

// List returns copies of the live sandboxes of this node, by id.
func (n *Node) List() []*store.Sandbox {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]*store.Sandbox, 0, len(n.cache))
	for _, sb := range n.cache {
		c := *sb
		out = append(out, &c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Store returns the node's store.
func (n *Node) Store() *store.Store { return n.st }

// Counts returns the number of live sandboxes per state.
func (n *Node) Counts() map[store.SandboxState]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[store.SandboxState]int{}
	for _, sb := range n.cache {
		out[sb.State]++
	}
	return out
}

var transitions = map[store.SandboxState][]store.SandboxState{
	store.StateCreating: {store.StateRunning, store.StateFailed},
	store.StateRunning:  {store.StatePausing, store.StateKilled},
	store.StatePausing:  {store.StatePaused, store.StateRunning, store.StateFailed},
	store.StatePaused:   {store.StateResuming, store.StateKilled},
	store.StateResuming: {store.StateRunning, store.StatePaused, store.StateFailed},
	store.StateFailed:   {store.StateKilled},
}

// Allowed reports whether from -> to is a transition of the state machine.
func Allowed(from, to store.SandboxState) bool {
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// transition moves sb to state `to`, persists it, updates the cache and
// records an event. The caller holds sb's lock.
func (n *Node) transition(ctx context.Context, sb *store.Sandbox, to store.SandboxState, msg string) error {
	from := sb.State
	if !Allowed(from, to) {
		return errs.E(errs.Conflict, "sandbox %q is %s, cannot become %s", sb.ID, from, to)
	}
	sb.State = to
	if to == store.StateRunning && from != store.StatePausing {
		sb.Gen++
	}
	now := n.now().UTC()
	switch to {
	case store.StatePaused:
		sb.PausedAt = now
	case store.StateKilled, store.StateFailed:
		sb.EndedAt = now
		if to == store.StateFailed {
			sb.Reason = msg
		}
	}
	// Persist even if the caller went away: the runtime already acted.
	ctx = context.WithoutCancel(ctx)
	if err := n.st.UpdateSandbox(ctx, sb); err != nil {
		sb.State = from
		return err
	}
	n.setCache(sb)
	n.event(ctx, sb.ID, "transition", from, to, msg)
	n.log.Info("sandbox "+string(to), "sandbox", sb.ID, "from", from, "msg", msg)
	return nil
}

func (n *Node) setCache(sb *store.Sandbox) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if sb.State.Live() {
		c := *sb
		n.cache[sb.ID] = &c
	} else {
		delete(n.cache, sb.ID)
	}
}

func (n *Node) event(ctx context.Context, id, kind string, from, to store.SandboxState, msg string) {
	if err := n.st.AddEvent(context.WithoutCancel(ctx), &store.Event{SandboxID: id, Kind: kind, From: from, To: to, Message: msg, At: n.now().UTC()}); err != nil {
		n.log.Warn("record event", "sandbox", id, "err", err)
	}
}

// CreateRequest is what a node needs to create a sandbox.
type CreateRequest struct {
	ID              string
	KeyID           string
	Template        *store.Template
	Alias           string
	Timeout         time.Duration
	Metadata        map[string]string
	EnvVars         map[string]string
	EnvdToken       string
	TrafficToken    string
	AllowInternet   *bool
	Network         store.Network
	AutoPause       bool
	AutoPauseMemory bool
	AutoResume      bool
	// SnapshotID, if set, restores the sandbox from this snapshot (taken
	// on this node by Snapshot) instead of from Template's snapshot;
	// Template then describes the snapshot's source sandbox.
	SnapshotID string
	// SnapshotAccessToken is the envd token of the snapshot's source
	// sandbox (its restored agent holds it until told the new one).
	SnapshotAccessToken string
}

// Create makes a sandbox and returns its record once it runs.
func (n *Node) Create(ctx context.Context, req CreateRequest) (*store.Sandbox, error) {
	if err := n.reserve(req.ID); err != nil {
		return nil, err
	}
	unlock := n.lockSandbox(req.ID)
	defer unlock()
	now := n.now().UTC()
	t := req.Template
	sb := &store.Sandbox{
		ID: req.ID, KeyID: req.KeyID, TemplateID: t.ID, Alias: req.Alias, NodeID: n.cfg.ID, State: store.StateCreating,
		CPUCount: t.CPUCount, MemoryMB: t.MemoryMB, DiskMB: t.DiskMB, EnvdVersion: t.EnvdVersion,
		EnvdToken: req.EnvdToken, TrafficToken: req.TrafficToken, Metadata: req.Metadata, EnvVars: req.EnvVars,
		Network: req.Network, AllowInternet: req.AllowInternet, AutoPause: req.AutoPause,
		AutoPauseMemory: req.AutoPauseMemory, AutoResume: req.AutoResume, TimeoutS: int(req.Timeout / time.Second),
		StartedAt: now, EndAt: now.Add(req.Timeout),
	}
	if err := n.st.CreateSandbox(ctx, sb); err != nil {
		n.release(req.ID)
		return nil, err
	}
	n.setCache(sb)
	from := "template " + t.ID
	if req.SnapshotID != "" {
		from = "snapshot " + req.SnapshotID
	}
	n.event(ctx, sb.ID, "transition", "", store.StateCreating, from)
	// The runtime call outlives a caller that hangs up, so the record
	// always ends in running or failed.
	opCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), n.cfg.OpTimeout)
	defer cancel()
	labels := map[string]string{"cube.key": req.KeyID, "cube.template": t.ID}
	spec := runtime.CreateSpec{
		ID: sb.ID, TemplateID: t.ID, SnapshotID: req.SnapshotID, SnapshotAccessToken: req.SnapshotAccessToken,
		Resources: runtime.Resources{CPUCount: t.CPUCount, MemoryMB: t.MemoryMB, DiskMB: t.DiskMB},
		Env:       req.EnvVars, AccessToken: req.EnvdToken, Labels: labels,
	}
	var err error
	if pr, ok := n.rt.(PolicyRuntime); ok {
		_, err = pr.CreateWithPolicy(opCtx, spec, Policy(sb.AllowInternet, sb.Network))
	} else {
		_, err = n.rt.Create(opCtx, spec)
	}
	if err != nil {
		n.rt.Destroy(context.WithoutCancel(ctx), sb.ID) // leave nothing behind
		n.transition(ctx, sb, store.StateFailed, "create: "+errs.Message(err))
		n.release(sb.ID)
		n.log.Error("create sandbox", "sandbox", sb.ID, "err", err)
		return nil, err
	}
	now = n.now().UTC()
	sb.StartedAt, sb.EndAt = now, now.Add(req.Timeout)
	if err := n.transition(ctx, sb, store.StateRunning, ""); err != nil {
		n.rt.Destroy(context.WithoutCancel(ctx), sb.ID)
		n.release(sb.ID)
		return nil, err
	}
	return sb, nil
}

// Snapshot takes snapshot snapshotID of the running or paused sandbox id
// (E2B createSnapshot and fork). A running sandbox keeps running with its
// end time untouched; a paused one stays paused and resumable: the
// runtime snapshots it from its pause checkpoint, or, if it cannot
// (Conflict), the node resumes it, snapshots it and pauses it again under
// the sandbox's lock (needing a free slot meanwhile). Conflict in any
// other state. The snapshot lives on this node until DeleteSnapshot.
func (n *Node) Snapshot(ctx context.Context, id, snapshotID string) (runtime.Snapshot, error) {
	unlock := n.lockSandbox(id)
	defer unlock()
	sb, err := n.Get(id)
	if err != nil {
		return runtime.Snapshot{}, err
	}
	if sb.State != store.StateRunning && sb.State != store.StatePaused {
		return runtime.Snapshot{}, errs.E(errs.Conflict, "sandbox %q is %s, not running or paused", id, sb.State)
	}
	opCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), n.cfg.OpTimeout)
	defer cancel()
	snap, err := n.rt.Snapshot(opCtx, id, snapshotID)
	if err != nil && sb.State == store.StatePaused && errs.Is(err, errs.Conflict) {
		snap, err = n.snapshotByResume(opCtx, sb, snapshotID)
	}
	if err != nil {
		n.event(ctx, id, "error", sb.State, sb.State, "snapshot: "+errs.Message(err))
		return runtime.Snapshot{}, err
	}
	n.event(ctx, id, "snapshot", sb.State, sb.State, "snapshot "+snapshotID)
	return snap, nil
}

// snapshotByResume snapshots the paused sandbox sb for a runtime that
// snapshots only running sandboxes: resume, snapshot, pause again. The
// record stays paused throughout (the caller holds the sandbox's lock, and
// the proxy does not route to a paused sandbox). If the sandbox cannot be
// paused again its record follows the runtime: running, holding its slot.
func (n *Node) snapshotByResume(ctx context.Context, sb *store.Sandbox, snapshotID string) (runtime.Snapshot, error) {
	if err := n.reserve(sb.ID); err != nil {
		return runtime.Snapshot{}, err
	}
	if _, err := n.rt.Resume(ctx, sb.ID, runtime.NetSlot{}); err != nil {
		n.release(sb.ID)
		return runtime.Snapshot{}, err
	}
	snap, err := n.rt.Snapshot(ctx, sb.ID, snapshotID)
	if perr := n.rt.Pause(ctx, sb.ID); perr != nil {
		n.log.Error("pause again after snapshot", "sandbox", sb.ID, "err", perr)
		if err == nil {
			n.rt.DeleteSnapshot(ctx, snapshotID)
		}
		n.transition(ctx, sb, store.StateResuming, "snapshot of a paused sandbox")
		sb.EndAt = n.now().UTC().Add(time.Duration(max(sb.TimeoutS, 15)) * time.Second)
		sb.PausedAt = time.Time{}
		n.transition(ctx, sb, store.StateRunning, "could not pause again after the snapshot: "+errs.Message(perr))
		return runtime.Snapshot{}, perr
	}
	n.release(sb.ID)
	return snap, err
}

// DeleteSnapshot removes a snapshot taken on this node. Sandboxes already
// created from it are not affected.
func (n *Node) DeleteSnapshot(ctx context.Context, snapshotID string) error {
	return n.rt.DeleteSnapshot(context.WithoutCancel(ctx), snapshotID)
}

// Kill destroys a sandbox in any live state.
func (n *Node) Kill(ctx context.Context, id string) error {
	unlock := n.lockSandbox(id)
	defer unlock()
	sb, err := n.Get(id)
	if err != nil {
		return err
	}
	if err := n.rt.Destroy(context.WithoutCancel(ctx), id); err != nil && !errs.Is(err, errs.NotFound) {
		n.event(ctx, id, "error", sb.State, sb.State, "destroy: "+errs.Message(err))
		return err
	}
	if sb.State != store.StateRunning && sb.State != store.StatePaused && sb.State != store.StateFailed {
		// A state left by a crash (creating, pausing, resuming): fail first.
		n.transition(ctx, sb, store.StateFailed, "killed while "+string(sb.State))
	}
	err = n.transition(ctx, sb, store.StateKilled, "")
	n.release(id)
	return err
}

// Pause snapshots a running sandbox and frees its slot. Conflict if it is
// already paused.
func (n *Node) Pause(ctx context.Context, id string) error {
	unlock := n.lockSandbox(id)
	defer unlock()
	return n.pauseLocked(ctx, id, "")
}

func (n *Node) pauseLocked(ctx context.Context, id, why string) error {
	sb, err := n.Get(id)
	if err != nil {
		return err
	}
	if sb.State == store.StatePaused {
		return errs.E(errs.Conflict, "sandbox %q is already paused", id)
	}
	if err := n.transition(ctx, sb, store.StatePausing, why); err != nil {
		return err
	}
	opCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), n.cfg.OpTimeout)
	defer cancel()
	if err := n.rt.Pause(opCtx, id); err != nil {
		if errs.Is(err, errs.NotFound) {
			n.transition(ctx, sb, store.StateFailed, "pause: the runtime lost the sandbox")
			n.release(id)
			return errs.E(errs.NotFound, "sandbox %q not found", id)
		}
		n.transition(ctx, sb, store.StateRunning, "pause failed: "+errs.Message(err))
		return err
	}
	if err := n.transition(ctx, sb, store.StatePaused, ""); err != nil {
		return err
	}
	n.release(id)
	return nil
}

// Resume brings a paused sandbox back with a new end time now+timeout.
// Conflict if it is running.
func (n *Node) Resume(ctx context.Context, id string, timeout time.Duration) (*store.Sandbox, error) {
	unlock := n.lockSandbox(id)
	defer unlock()
	return n.resumeLocked(ctx, id, timeout)
}

func (n *Node) resumeLocked(ctx context.Context, id string, timeout time.Duration) (*store.Sandbox, error) {
	sb, err := n.Get(id)
	if err != nil {
		return nil, err
	}
	if sb.State == store.StateRunning {
		return nil, errs.E(errs.Conflict, "sandbox %q is already running", id)
	}
	if sb.State != store.StatePaused {
		return nil, errs.E(errs.Conflict, "sandbox %q is %s", id, sb.State)
	}
	if err := n.reserve(id); err != nil {
		return nil, err
	}
	if err := n.transition(ctx, sb, store.StateResuming, ""); err != nil {
		n.release(id)
		return nil, err
	}
	opCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), n.cfg.OpTimeout)
	defer cancel()
	if _, err := n.rt.Resume(opCtx, id, runtime.NetSlot{}); err != nil {
		n.release(id)
		if errs.Is(err, errs.NotFound) {
			n.transition(ctx, sb, store.StateFailed, "resume: the runtime lost the sandbox")
			return nil, errs.E(errs.NotFound, "sandbox %q not found", id)
		}
		n.transition(ctx, sb, store.StatePaused, "resume failed: "+errs.Message(err))
		return nil, err
	}
	sb.EndAt = n.now().UTC().Add(timeout)
	sb.PausedAt = time.Time{}
	if err := n.transition(ctx, sb, store.StateRunning, ""); err != nil {
		return nil, err
	}
	return sb, nil
}

// Connect makes sure id runs: a paused sandbox is resumed (resumed=true)
// with end time now+timeout; a running one only gets its end time extended
// to at least now+timeout.
func (n *Node) Connect(ctx context.Context, id string, timeout time.Duration) (sb *store.Sandbox, resumed bool, err error) {
	unlock := n.lockSandbox(id)
	defer unlock()
	cur, err := n.Get(id)
	if err != nil {
		return nil, false, err
	}
	switch cur.State {
	case store.StatePaused:
		sb, err := n.resumeLocked(ctx, id, timeout)
		return sb, err == nil, err
	case store.StateRunning:
		if end := n.now().UTC().Add(timeout); end.After(cur.EndAt) {
			cur.EndAt = end
			if err := n.save(ctx, cur); err != nil {
				return nil, false, err
			}
		}
		return cur, false, nil
	}
	return nil, false, errs.E(errs.Conflict, "sandbox %q is %s", id, cur.State)
}

func (n *Node) save(ctx context.Context, sb *store.Sandbox) error {
	if err := n.st.UpdateSandbox(context.WithoutCancel(ctx), sb); err != nil {
		return err
	}
	n.setCache(sb)
	return nil
}

// SetTimeout replaces the end time with now+timeout (it may shorten it).
func (n *Node) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	unlock := n.lockSandbox(id)
	defer unlock()
	sb, err := n.Get(id)
	if err != nil {
		return err
	}
	sb.EndAt = n.now().UTC().Add(timeout)
	return n.save(ctx, sb)
}

// Refresh extends the end time to at least now+d.
func (n *Node) Refresh(ctx context.Context, id string, d time.Duration) error {
	unlock := n.lockSandbox(id)
	defer unlock()
	sb, err := n.Get(id)
	if err != nil {
		return err
	}
	if end := n.now().UTC().Add(d); end.After(sb.EndAt) {
		sb.EndAt = end
		return n.save(ctx, sb)
	}
	return nil
}

// SetNetwork stores a new egress policy and hands it to the runtime.
func (n *Node) SetNetwork(ctx context.Context, id string, allowInternet *bool, nw store.Network) error {
	unlock := n.lockSandbox(id)
	defer unlock()
	sb, err := n.Get(id)
	if err != nil {
		return err
	}
	if pr, ok := n.rt.(PolicyRuntime); ok {
		if err := pr.SetPolicy(id, Policy(allowInternet, nw)); err != nil {
			return err
		}
	}
	sb.AllowInternet = allowInternet
	keep := sb.Network
	sb.Network = nw
	sb.Network.AllowPublicTraffic = keep.AllowPublicTraffic
	sb.Network.MaskRequestHost = keep.MaskRequestHost
	if err := n.save(ctx, sb); err != nil {
		return err
	}
	n.event(ctx, id, "network", sb.State, sb.State, "egress policy updated")
	return nil
}

// Stats returns current usage of a running sandbox (Conflict if paused).
func (n *Node) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	sb, err := n.Get(id)
	if err != nil {
		return runtime.Stats{}, err
	}
	if sb.State != store.StateRunning {
		return runtime.Stats{}, errs.E(errs.Conflict, "sandbox %q is %s", id, sb.State)
	}
	return n.rt.Stats(ctx, id)
}

// Dial connects to port in a running sandbox. A paused sandbox created
// with autoResume is resumed first (if allowResume); otherwise a sandbox
// that is not running is NotFound.
// Connection refused right after create or resume is retried for a short
// grace period (the SDK sends RPCs the moment it gets 201).
func (n *Node) Dial(ctx context.Context, id string, port int, allowResume bool) (net.Conn, error) {
	sb, err := n.Get(id)
	if err != nil {
		return nil, err
	}
	if sb.State == store.StatePaused && sb.AutoResume && allowResume {
		timeout := time.Duration(sb.TimeoutS) * time.Second
		if timeout <= 0 {
			timeout = 300 * time.Second
		}
		if _, _, err := n.Connect(ctx, id, timeout); err != nil {
			return nil, err
		}
	} else if sb.State != store.StateRunning {
		return nil, errs.E(errs.NotFound, "sandbox %q is %s", id, sb.State)
	}
	deadline := n.now().Add(dialGrace)
	for {
		c, err := n.rt.Dial(ctx, id, port)
		if err == nil {
			return c, nil
		}
		if !errs.Is(err, errs.Unavailable) || n.now().After(deadline) {
			return nil, err
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// dialGrace is how long a refused connection is retried.
const dialGrace = 2 * time.Second

// expiryLoop kills or pauses sandboxes whose end time passed.
func (n *Node) expiryLoop() {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.ExpiryInterval)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			n.ExpireNow(context.Background())
		}
	}
}

// ExpireNow handles every sandbox whose end time has passed: pause if it
// asked for autoPause, else kill. Paused sandboxes never expire.
func (n *Node) ExpireNow(ctx context.Context) {
	now := n.now()
	n.mu.Lock()
	var due []*store.Sandbox
	for _, sb := range n.cache {
		if sb.State == store.StateRunning && !sb.EndAt.After(now) {
			c := *sb
			due = append(due, &c)
		}
	}
	n.mu.Unlock()
	sort.Slice(due, func(i, j int) bool { return due[i].EndAt.Before(due[j].EndAt) })
	for _, sb := range due {
		n.expire(ctx, sb.ID)
	}
}

func (n *Node) expire(ctx context.Context, id string) {
	unlock := n.lockSandbox(id)
	defer unlock()
	sb, err := n.Get(id)
	// Re-check under the lock: setTimeout or a kill may have won.
	if err != nil || sb.State != store.StateRunning || sb.EndAt.After(n.now()) {
		return
	}
	if sb.AutoPause {
		if err := n.pauseLocked(ctx, id, "timeout"); err != nil {
			n.log.Error("pause at expiry", "sandbox", id, "err", err)
		}
		return
	}
	if err := n.rt.Destroy(ctx, id); err != nil && !errs.Is(err, errs.NotFound) {
		n.log.Error("kill at expiry", "sandbox", id, "err", err)
		return
	}
	n.transition(ctx, sb, store.StateKilled, "timeout")
	n.release(id)
}
