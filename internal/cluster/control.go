package cluster

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/store"
)

// ControlConfig configures a Control.
type ControlConfig struct {
	Token     string        // the shared cluster token (required)
	Heartbeat time.Duration // interval told to nodes (default DefaultHeartbeat)
	DownAfter time.Duration // silence after which a node is down (default 3 heartbeats)
}

// Control is the control plane's side of the cluster: it takes node
// reports (POST /cluster/v1/heartbeat), keeps a RemoteNode per node in the
// master, mirrors node records into the store and marks silent nodes
// down.
type Control struct {
	cfg  ControlConfig
	st   *store.Store
	m    *master.Master
	log  *slog.Logger
	http *http.Client
	now  func() time.Time

	mu    sync.Mutex
	nodes map[string]*RemoteNode     // guarded by mu
	tpls  map[string]*store.Template // templates last written (guarded by mu)
	wmu   map[string]*sync.Mutex     // per-node mirror write lock (guarded by mu)

	stop chan struct{}
	wg   sync.WaitGroup
}

var nodeIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// NewControl returns a Control over st and m. The nodes the store knows
// are added to m at once with their live sandboxes (a restarted control
// routes to them before they report again); a node that does not report
// within DownAfter is marked down. Call Start to run the liveness loop.
func NewControl(ctx context.Context, cfg ControlConfig, st *store.Store, m *master.Master, log *slog.Logger) (*Control, error) {
	if cfg.Token == "" {
		return nil, errs.E(errs.InvalidArgument, "a cluster needs a token (config clusterToken, CUBE_CLUSTER_TOKEN or --cluster-token)")
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = DefaultHeartbeat
	}
	if cfg.DownAfter <= 0 {
		cfg.DownAfter = 3 * cfg.Heartbeat
	}
	c := &Control{cfg: cfg, st: st, m: m, log: log.With("component", "cluster"), now: time.Now,
		nodes: map[string]*RemoteNode{}, tpls: map[string]*store.Template{}, wmu: map[string]*sync.Mutex{},
		stop: make(chan struct{})}
	c.http = &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     90 * time.Second,
	}}
	recs, err := st.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	for _, rec := range recs {
		if rec.Address == "local" || !nodeIDRE.MatchString(rec.ID) {
			continue // the all-in-one server's node
		}
		r := newRemote(c, rec.ID)
		r.addr, r.rt, r.capacity, r.lastSeen = rec.Address, rec.Runtime, rec.Capacity, c.now()
		r.down = rec.State == "down"
		sbs, _, err := st.ListSandboxes(ctx, store.SandboxFilter{NodeID: rec.ID,
			States: []store.SandboxState{store.StateCreating, store.StateRunning, store.StatePausing, store.StatePaused, store.StateResuming}})
		if err != nil {
			return nil, err
		}
		for _, sb := range sbs {
			// The stored updatedAt is the control's write time, not the
			// node's: let the node's next report of it win.
			sb.UpdatedAt = time.Time{}
			r.sbs[sb.ID] = sb
		}
		c.nodes[rec.ID] = r
		m.Add(r)
	}
	if ts, err := st.ListTemplates(ctx); err == nil {
		for _, t := range ts {
			c.tpls[t.ID] = t
		}
	}
	return c, nil
}

// SetClock replaces time.Now (tests).
func (c *Control) SetClock(now func() time.Time) { c.now = now }

// Handler serves /cluster/v1/ (nodes' heartbeats; ping, which checks the
// token; nodes, the operator's view), token required.
func (c *Control) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /cluster/v1/heartbeat", c.heartbeat)
	mux.HandleFunc("GET /cluster/v1/ping", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("GET /cluster/v1/nodes", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, c.Status()) })
	return requireToken(c.cfg.Token, mux)
}

// Nodes returns the remote nodes by id.
func (c *Control) Nodes() map[string]*RemoteNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]*RemoteNode, len(c.nodes))
	for k, v := range c.nodes {
		out[k] = v
	}
	return out
}

// NodeStatus is one node as the control sees it (GET /cluster/v1/nodes).
type NodeStatus struct {
	ID          string    `json:"id"`
	Address     string    `json:"address"`
	Runtime     string    `json:"runtime"`
	State       string    `json:"state"` // ready | down
	Capacity    int       `json:"capacity"`
	Free        int       `json:"free"`
	Sandboxes   int       `json:"sandboxes"` // live ones
	HeartbeatAt time.Time `json:"heartbeatAt"`
}

// Status lists the nodes by id.
func (c *Control) Status() []NodeStatus {
	out := []NodeStatus{}
	for _, r := range c.Nodes() {
		r.mu.Lock()
		st := NodeStatus{ID: r.id, Address: r.addr, Runtime: r.rt, State: "ready", Capacity: r.capacity, Free: max(r.capacity-r.usedLocked(), 0),
			Sandboxes: len(r.sbs), HeartbeatAt: r.lastSeen.UTC()}
		if r.down {
			st.State, st.Free = "down", 0
		}
		r.mu.Unlock()
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Start runs the liveness loop until Stop.
func (c *Control) Start() {
	every := c.cfg.DownAfter / 4
	if every < 50*time.Millisecond {
		every = 50 * time.Millisecond
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-t.C:
				c.CheckLiveness(context.Background())
			}
		}
	}()
}

// Stop ends the liveness loop.
func (c *Control) Stop() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	c.wg.Wait()
	c.http.CloseIdleConnections()
}

func (c *Control) heartbeat(w http.ResponseWriter, r *http.Request) {
	var rep Report
	if err := readJSON(r, &rep); err != nil {
		writeErr(w, err)
		return
	}
	if err := c.Report(r.Context(), &rep); err != nil {
		writeErr(w, err)
		return
	}
	cursor := ""
	if n := c.Nodes()[rep.ID]; n != nil {
		n.mu.Lock()
		cursor = n.evCursor
		n.mu.Unlock()
	}
	writeJSON(w, http.StatusOK, ReportReply{HeartbeatMS: c.cfg.Heartbeat.Milliseconds(), EventCursor: cursor})
}

func validReport(rep *Report) error {
	if !nodeIDRE.MatchString(rep.ID) || rep.ID == "local" {
		return errs.E(errs.InvalidArgument, "bad node id %q", rep.ID)
	}
	host, port, err := net.SplitHostPort(rep.Address)
	if p, perr := strconv.Atoi(port); err != nil || host == "" || perr != nil || p <= 0 || p > 65535 {
		return errs.E(errs.InvalidArgument, "bad node address %q (want host:port)", rep.Address)
	}
	if rep.Capacity < 0 || rep.Capacity > 1<<20 || rep.Free > rep.Capacity {
		return errs.E(errs.InvalidArgument, "bad capacity %d/%d", rep.Free, rep.Capacity)
	}
	for _, sb := range rep.Sandboxes {
		if sb == nil || sb.ID == "" || sb.NodeID != rep.ID {
			return errs.E(errs.InvalidArgument, "a reported sandbox does not belong to node %q", rep.ID)
		}
	}
	for _, t := range rep.Templates {
		if t == nil || t.ID == "" {
			return errs.E(errs.InvalidArgument, "a reported template has no id")
		}
	}
	if len(rep.Events) > maxEvents {
		return errs.E(errs.InvalidArgument, "more than %d events in one report", maxEvents)
	}
	for _, e := range rep.Events {
		if e == nil || e.ID == "" || len(e.ID) > 64 || e.SandboxID == "" {
			return errs.E(errs.InvalidArgument, "a reported event has no id or sandbox")
		}
	}
	return nil
}

// Report takes a node's registration or heartbeat.
func (c *Control) Report(ctx context.Context, rep *Report) error {
	if err := validReport(rep); err != nil {
		return err
	}
	now := c.now()
	c.mu.Lock()
	r := c.nodes[rep.ID]
	isNew := r == nil
	if isNew {
		r = newRemote(c, rep.ID)
		c.nodes[rep.ID] = r
	}
	c.mu.Unlock()
	r.mu.Lock()
	wasDown := r.down
	moved := r.addr != "" && r.addr != rep.Address
	r.addr, r.rt, r.capacity, r.lastSeen, r.down = rep.Address, rep.Runtime, rep.Capacity, now, false
	r.ready = map[string]bool{}
	for _, t := range rep.Templates {
		if t.State == "ready" {
			r.ready[t.ID] = true
		}
	}
	r.mu.Unlock()
	if isNew {
		c.m.Add(r)
	}
	if isNew || wasDown || moved {
		c.log.Info("node registered", "node", rep.ID, "address", rep.Address, "runtime", rep.Runtime, "capacity", rep.Capacity,
			"sandboxes", len(rep.Sandboxes), "was_down", wasDown)
	}
	if err := c.st.PutNode(ctx, &store.Node{ID: rep.ID, Address: rep.Address, Runtime: rep.Runtime, Capacity: rep.Capacity,
		State: "ready", HeartbeatAt: now}); err != nil {
		return err
	}
	c.syncTemplates(ctx, rep.Templates)
	for _, e := range rep.Events {
		ev := *e
		if err := c.st.AddEvent(ctx, &ev); err != nil && !errs.Is(err, errs.AlreadyExists) {
			return err
		}
		r.mu.Lock()
		if e.ID > r.evCursor {
			r.evCursor = e.ID
		}
		r.mu.Unlock()
	}
	seen := map[string]bool{}
	for _, sb := range rep.Sandboxes {
		seen[sb.ID] = true
		c.mirror(r, sb)
	}
	// Sandboxes the control holds live but the node did not report ended
	// (expiry) or were created after the report was made: ask the node.
	r.mu.Lock()
	var missing []string
	for id := range r.sbs {
		if !seen[id] {
			missing = append(missing, id)
		}
	}
	r.mu.Unlock()
	for _, id := range missing {
		c.refresh(r, id)
	}
	return nil
}

func (c *Control) writeLock(nodeID string) *sync.Mutex {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.wmu[nodeID]
	if l == nil {
		l = &sync.Mutex{}
		c.wmu[nodeID] = l
	}
	return l
}

// mirror records sb (the node's record) in r's view and in the store,
// unless a newer record of it is already known.
func (c *Control) mirror(r *RemoteNode, sb *store.Sandbox) {
	if sb == nil || sb.NodeID != r.id {
		return
	}
	// The node's records come from its cache (ns) or its store (ms):
	// compare at the store's precision. On a tie the record that arrives
	// later wins, except over an ended one.
	in := *sb
	in.UpdatedAt = in.UpdatedAt.Truncate(time.Millisecond)
	sb = &in
	l := c.writeLock(r.id)
	l.Lock()
	defer l.Unlock()
	r.mu.Lock()
	if cur, ok := r.sbs[sb.ID]; ok {
		if cur.UpdatedAt.After(sb.UpdatedAt) {
			r.mu.Unlock()
			return
		}
		if cur.UpdatedAt.Equal(sb.UpdatedAt) && cur.State == sb.State && cur.Gen == sb.Gen {
			r.mu.Unlock()
			return // nothing new
		}
	} else if at, ok := r.ended[sb.ID]; ok && !sb.UpdatedAt.After(at) {
		r.mu.Unlock()
		return
	}
	cp := *sb
	if sb.State.Live() {
		r.sbs[sb.ID] = &cp
	} else {
		delete(r.sbs, sb.ID)
		r.ended[sb.ID] = sb.UpdatedAt
		if len(r.ended) > 4096 {
			r.pruneEnded(c.now())
		}
	}
	r.mu.Unlock()
	rec := cp
	if err := c.st.PutSandbox(context.Background(), &rec); err != nil {
		c.log.Warn("record sandbox of node", "node", r.id, "sandbox", sb.ID, "err", err)
	}
}

// pruneEnded forgets ended ids older than ten minutes. Caller holds r.mu.
func (r *RemoteNode) pruneEnded(now time.Time) {
	for id, at := range r.ended {
		if now.Sub(at) > 10*time.Minute {
			delete(r.ended, id)
		}
	}
}

// refresh asks the node for its record of id and mirrors it. A record the
// node does not have any more (it lost it) is recorded failed.
func (c *Control) refresh(r *RemoteNode, id string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var sb store.Sandbox
	err := r.call(ctx, "GET", sbPath(id, ""), nil, &sb)
	switch {
	case err == nil:
		c.mirror(r, &sb)
	case errs.Is(err, errs.NotFound):
		if cur, gerr := r.Get(id); gerr == nil {
			cur.State, cur.Reason, cur.EndedAt = store.StateFailed, "the node lost the sandbox", c.now().UTC()
			cur.UpdatedAt = c.now()
			c.mirror(r, cur)
		}
	default:
		c.log.Debug("refresh sandbox from node", "node", r.id, "sandbox", id, "err", err)
	}
}

// syncTemplates records the templates a node reported: new ones, and
// changed ones unless that would turn a ready template into a not ready
// one (another node may have it ready). Spawn counts are kept.
func (c *Control) syncTemplates(ctx context.Context, ts []*store.Template) {
	for _, t := range ts {
		c.mu.Lock()
		old := c.tpls[t.ID]
		c.mu.Unlock()
		if old != nil && (sameTemplate(old, t) || (old.State == "ready" && t.State != "ready")) {
			continue
		}
		nt := *t
		if old != nil {
			nt.SpawnCount, nt.LastSpawnedAt, nt.CreatedAt = old.SpawnCount, old.LastSpawnedAt, old.CreatedAt
		}
		if err := c.st.PutTemplate(ctx, &nt); err != nil {
			c.log.Warn("record template of node", "template", t.ID, "err", err)
			continue
		}
		c.mu.Lock()
		c.tpls[t.ID] = &nt
		c.mu.Unlock()
	}
}

func sameTemplate(a, b *store.Template) bool {
	if a.State != b.State || a.Reason != b.Reason || a.CPUCount != b.CPUCount || a.MemoryMB != b.MemoryMB ||
		a.DiskMB != b.DiskMB || a.EnvdVersion != b.EnvdVersion || len(a.Aliases) != len(b.Aliases) || len(a.Ports) != len(b.Ports) {
		return false
	}
	for i := range a.Aliases {
		if a.Aliases[i] != b.Aliases[i] {
			return false
		}
	}
	for i := range a.Ports {
		if a.Ports[i] != b.Ports[i] {
			return false
		}
	}
	return true
}

// CheckLiveness marks down every node silent for longer than DownAfter:
// it gets no new sandboxes, and its live sandboxes are recorded failed
// ("node N is down") and no longer routed.
func (c *Control) CheckLiveness(ctx context.Context) {
	now := c.now()
	for _, r := range c.Nodes() {
		r.mu.Lock()
		if r.down || now.Sub(r.lastSeen) <= c.cfg.DownAfter {
			r.mu.Unlock()
			continue
		}
		r.down = true
		var lost []*store.Sandbox
		for _, sb := range r.sbs {
			lost = append(lost, sb)
		}
		r.sbs = map[string]*store.Sandbox{}
		rec := &store.Node{ID: r.id, Address: r.addr, Runtime: r.rt, Capacity: r.capacity, State: "down", HeartbeatAt: r.lastSeen}
		r.mu.Unlock()
		c.log.Warn("node down", "node", r.id, "silent_for", now.Sub(rec.HeartbeatAt).Round(time.Millisecond), "sandboxes", len(lost))
		if err := c.st.PutNode(ctx, rec); err != nil {
			c.log.Warn("record node down", "node", r.id, "err", err)
		}
		l := c.writeLock(r.id)
		l.Lock()
		for _, sb := range lost {
			sb.State, sb.Reason, sb.EndedAt = store.StateFailed, "node "+r.id+" is down", now.UTC()
			if err := c.st.PutSandbox(ctx, sb); err != nil {
				c.log.Warn("record sandbox of a down node", "sandbox", sb.ID, "err", err)
			}
		}
		l.Unlock()
	}
}
