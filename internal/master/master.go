// Package master is the control plane's view of the nodes: it picks the
// node a new sandbox goes to (the scheduler) and routes per-sandbox
// operations to the node that owns the sandbox. In the all-in-one server
// there is one node, the local one; the cluster split (cube node --join)
// adds remote nodes behind the same Node interface.
package master

import (
	"context"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// Node is what the master needs from a node. *node.Node implements it.
type Node interface {
	ID() string
	Free() int
	Capacity() int
	Create(ctx context.Context, req node.CreateRequest) (*store.Sandbox, error)
	Get(id string) (*store.Sandbox, error)
	Kill(ctx context.Context, id string) error
	Pause(ctx context.Context, id string) error
	Resume(ctx context.Context, id string, timeout time.Duration) (*store.Sandbox, error)
	Connect(ctx context.Context, id string, timeout time.Duration) (*store.Sandbox, bool, error)
	SetTimeout(ctx context.Context, id string, timeout time.Duration) error
	Refresh(ctx context.Context, id string, d time.Duration) error
	SetNetwork(ctx context.Context, id string, allowInternet *bool, nw store.Network) error
	Stats(ctx context.Context, id string) (runtime.Stats, error)
	Metrics(ctx context.Context, id string, start, end time.Time) ([]runtime.Stats, error)
	Dial(ctx context.Context, id string, port int, allowResume bool) (net.Conn, error)
	Counts() map[store.SandboxState]int
	Snapshot(ctx context.Context, id, snapshotID string) (runtime.Snapshot, error)
	DeleteSnapshot(ctx context.Context, snapshotID string) error
}

var _ Node = (*node.Node)(nil)

// Master schedules sandboxes onto nodes.
type Master struct {
	st *store.Store

	mu    sync.RWMutex
	nodes map[string]Node // guarded by mu
}

// New returns a Master over the given nodes.
func New(st *store.Store, nodes ...Node) *Master {
	m := &Master{st: st, nodes: map[string]Node{}}
	for _, n := range nodes {
		m.nodes[n.ID()] = n
	}
	return m
}

// Add registers n (replacing a node with the same id).
func (m *Master) Add(n Node) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nodes[n.ID()] = n
}

// Nodes returns the nodes, by id.
func (m *Master) Nodes() []Node {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]Node, 0, len(m.nodes))
	for _, n := range m.nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID() < out[j].ID() })
	return out
}

// Node returns the node with id; NotFound if there is none.
func (m *Master) Node(id string) (Node, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if n, ok := m.nodes[id]; ok {
		return n, nil
	}
	return nil, errs.E(errs.NotFound, "node %q not found", id)
}

// CreateOn creates a sandbox on the node with id (a sandbox restored from
// a snapshot must start where the snapshot is kept). Unavailable if that
// node is gone, ResourceExhausted with a retry hint if it is full.
func (m *Master) CreateOn(ctx context.Context, nodeID string, req node.CreateRequest) (*store.Sandbox, error) {
	n, err := m.Node(nodeID)
	if err != nil || !up(n) {
		return nil, &errs.Error{Kind: errs.Unavailable, Msg: "the node that keeps this snapshot is not available", RetryAfter: 10 * time.Second}
	}
	if n.Free() <= 0 {
		return nil, &errs.Error{Kind: errs.ResourceExhausted, Msg: "the node that keeps this snapshot is at capacity, retry later", RetryAfter: 5 * time.Second}
	}
	return n.Create(ctx, req)
}

// TemplateHaver is implemented by nodes that know which templates they
// have ready (cluster nodes report theirs); Create passes over a node
// without the template. A node without it is taken to have every one.
type TemplateHaver interface{ HasTemplate(id string) bool }

// Upper is implemented by nodes that can be down (a cluster node that
// stopped heartbeating). A node without it is always up.
type Upper interface{ Up() bool }

func up(n Node) bool {
	u, ok := n.(Upper)
	return !ok || u.Up()
}

// Rank orders the nodes a create should try: up nodes with a free slot,
// least loaded first (lowest share of capacity in use, then most free
// slots, then id). Free and Capacity are read once per node.
func Rank(nodes []Node) []Node {
	type cand struct {
		n          Node
		free, capa int
	}
	var cs []cand
	for _, n := range nodes {
		if !up(n) {
			continue
		}
		f, c := n.Free(), n.Capacity()
		if f <= 0 || c <= 0 {
			continue
		}
		cs = append(cs, cand{n, f, c})
	}
	sort.SliceStable(cs, func(i, j int) bool {
		// used_i/cap_i < used_j/cap_j without division.
		li, lj := (cs[i].capa-cs[i].free)*cs[j].capa, (cs[j].capa-cs[j].free)*cs[i].capa
		if li != lj {
			return li < lj
		}
		if cs[i].free != cs[j].free {
			return cs[i].free > cs[j].free
		}
		return cs[i].n.ID() < cs[j].n.ID()
	})
	out := make([]Node, len(cs))
	for i, c := range cs {
		out[i] = c.n
	}
	return out
}

// Create places a sandbox on the least loaded node (Rank). If a node
// fills between the choice and the reservation the next one is tried;
// when all are full the error is ResourceExhausted with a retry hint, and
// with no node up at all it is Unavailable.
func (m *Master) Create(ctx context.Context, req node.CreateRequest) (*store.Sandbox, error) {
	all := m.Nodes()
	anyUp := false
	for _, n := range all {
		anyUp = anyUp || up(n)
	}
	if !anyUp {
		return nil, &errs.Error{Kind: errs.Unavailable, Msg: "no node is available", RetryAfter: 10 * time.Second}
	}
	var lastErr error
	ranked := Rank(all)
	if req.Template != nil {
		var with []Node
		for _, n := range ranked {
			if th, ok := n.(TemplateHaver); !ok || th.HasTemplate(req.Template.ID) {
				with = append(with, n)
			}
		}
		if len(with) == 0 && len(ranked) > 0 {
			return nil, &errs.Error{Kind: errs.Unavailable, RetryAfter: 10 * time.Second,
				Msg: "no node with a free slot has template " + req.Template.ID + " ready"}
		}
		ranked = with
	}
	for _, n := range ranked {
		sb, err := n.Create(ctx, req)
		if err == nil {
			return sb, nil
		}
		if !errs.Is(err, errs.ResourceExhausted) {
			return nil, err
		}
		lastErr = err
	}
	if lastErr != nil {
		return nil, lastErr
	}
	return nil, &errs.Error{Kind: errs.ResourceExhausted, Msg: "all nodes are at capacity, retry later", RetryAfter: 5 * time.Second}
}

// Locate returns the live sandbox id and its node; NotFound if no node
// has it live.
func (m *Master) Locate(ctx context.Context, id string) (*store.Sandbox, Node, error) {
	for _, n := range m.Nodes() {
		if sb, err := n.Get(id); err == nil {
			return sb, n, nil
		}
	}
	return nil, nil, errs.E(errs.NotFound, "sandbox %q not found", id)
}

// Counts sums the live sandboxes per state over all nodes.
func (m *Master) Counts() map[store.SandboxState]int {
	out := map[store.SandboxState]int{}
	for _, n := range m.Nodes() {
		for k, v := range n.Counts() {
			out[k] += v
		}
	}
	return out
}
