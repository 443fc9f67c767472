package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// RemoteNode is the control's handle on one node: a master.Node that
// forwards calls to the node API and answers Get from the records the node
// reported (heartbeats and call results).
type RemoteNode struct {
	c  *Control
	id string

	mu       sync.Mutex
	addr     string
	rt       string
	capacity int
	inflight map[string]bool // creates sent, not answered yet (guarded by mu)
	lastSeen time.Time
	down     bool
	sbs      map[string]*store.Sandbox // live sandboxes (guarded by mu)
	// ended holds ids the node ended, with the UpdatedAt of their last
	// record, so that an older report does not bring them back.
	ended map[string]time.Time
	// evCursor is the newest event id of this node recorded.
	evCursor string
	// ready holds the ids of the templates the node reported ready; nil
	// until it reports (a node the control only knows from its store).
	ready map[string]bool
}

// HasTemplate reports whether the node has template id ready (true while
// it has not reported yet).
func (r *RemoteNode) HasTemplate(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ready == nil || r.ready[id]
}

var (
	_ master.Node          = (*RemoteNode)(nil)
	_ master.Upper         = (*RemoteNode)(nil)
	_ master.TemplateHaver = (*RemoteNode)(nil)
)

func newRemote(c *Control, id string) *RemoteNode {
	return &RemoteNode{c: c, id: id, sbs: map[string]*store.Sandbox{}, ended: map[string]time.Time{}, inflight: map[string]bool{}}
}

// ID returns the node id.
func (r *RemoteNode) ID() string { return r.id }

// Address returns the node API address.
func (r *RemoteNode) Address() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addr
}

// Up reports whether the node heartbeats.
func (r *RemoteNode) Up() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return !r.down
}

// Capacity is the capacity the node reported.
func (r *RemoteNode) Capacity() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.capacity
}

// Free is the capacity the node reported less the slots its sandboxes
// hold as the control knows them (creating, running, pausing, resuming,
// and creates in flight). Counting from the mirrored records, which never
// go back to an older version, keeps a report made before a create from
// freeing its slot again. 0 when the node is down.
func (r *RemoteNode) Free() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.down {
		return 0
	}
	return r.capacity - r.usedLocked()
}

// usedLocked counts the slots in use. Caller holds r.mu.
func (r *RemoteNode) usedLocked() int {
	used := 0
	for id, sb := range r.sbs {
		if sb.State != store.StatePaused && !r.inflight[id] {
			used++
		}
	}
	return used + len(r.inflight)
}

// Get returns the live sandbox id as last reported; NotFound if the node
// does not have it or is down.
func (r *RemoteNode) Get(id string) (*store.Sandbox, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if sb, ok := r.sbs[id]; ok && !r.down {
		c := *sb
		return &c, nil
	}
	return nil, errs.E(errs.NotFound, "sandbox %q not found", id)
}

// Counts counts the live sandboxes per state.
func (r *RemoteNode) Counts() map[store.SandboxState]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[store.SandboxState]int{}
	if r.down {
		return out
	}
	for _, sb := range r.sbs {
		out[sb.State]++
	}
	return out
}

// call sends method path with body in (JSON, or nothing if nil) and
// decodes the answer into out (if not nil).
func (r *RemoteNode) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return errs.Wrap(errs.Internal, err, "encode %s", path)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+r.Address()+path, body)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "node request")
	}
	req.Header.Set("Authorization", "Bearer "+r.c.cfg.Token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := r.c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return errs.Wrap(errs.Canceled, ctx.Err(), "node %s", r.id)
		}
		return &errs.Error{Kind: errs.Unavailable, Err: err, RetryAfter: 5 * time.Second,
			Msg: fmt.Sprintf("node %s is unreachable", r.id)}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, maxBody))
	if err != nil {
		return &errs.Error{Kind: errs.Unavailable, Err: err, Msg: fmt.Sprintf("node %s is unreachable", r.id)}
	}
	if res.StatusCode/100 != 2 {
		return decodeErr(res.StatusCode, b)
	}
	if out != nil && res.StatusCode != http.StatusNoContent {
		if err := json.Unmarshal(b, out); err != nil {
			return errs.Wrap(errs.Internal, err, "decode answer of node %s", r.id)
		}
	}
	return nil
}

func sbPath(id string, rest string) string {
	return "/node/v1/sandboxes/" + url.PathEscape(id) + rest
}

// op sends a sandbox operation whose answer is the record after it.
func (r *RemoteNode) op(ctx context.Context, method, id, rest string, in any) (*store.Sandbox, error) {
	var sb store.Sandbox
	if err := r.call(ctx, method, sbPath(id, rest), in, &sb); err != nil {
		if errs.Is(err, errs.NotFound) {
			r.c.refresh(r, id)
		}
		return nil, err
	}
	r.c.mirror(r, &sb)
	return &sb, nil
}

// Create forwards a create.
func (r *RemoteNode) Create(ctx context.Context, req node.CreateRequest) (*store.Sandbox, error) {
	r.mu.Lock()
	r.inflight[req.ID] = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.inflight, req.ID)
		r.mu.Unlock()
	}()
	var sb store.Sandbox
	if err := r.call(ctx, "POST", "/node/v1/sandboxes", req, &sb); err != nil {
		r.c.refresh(r, req.ID) // it may have been recorded failed
		return nil, err
	}
	r.c.mirror(r, &sb)
	return &sb, nil
}

// Kill forwards a kill.
func (r *RemoteNode) Kill(ctx context.Context, id string) error {
	_, err := r.op(ctx, "DELETE", id, "", nil)
	return err
}

// Pause forwards a pause.
func (r *RemoteNode) Pause(ctx context.Context, id string) error {
	_, err := r.op(ctx, "POST", id, "/pause", nil)
	return err
}

// Resume forwards a resume.
func (r *RemoteNode) Resume(ctx context.Context, id string, timeout time.Duration) (*store.Sandbox, error) {
	return r.op(ctx, "POST", id, "/resume", durationBody{MS: timeout.Milliseconds()})
}

// Connect forwards a connect.
func (r *RemoteNode) Connect(ctx context.Context, id string, timeout time.Duration) (*store.Sandbox, bool, error) {
	var rep connectReply
	if err := r.call(ctx, "POST", sbPath(id, "/connect"), durationBody{MS: timeout.Milliseconds()}, &rep); err != nil {
		return nil, false, err
	}
	if rep.Sandbox == nil {
		return nil, false, errs.E(errs.Internal, "node %s answered connect without a sandbox", r.id)
	}
	r.c.mirror(r, rep.Sandbox)
	return rep.Sandbox, rep.Resumed, nil
}

// SetTimeout forwards a timeout change.
func (r *RemoteNode) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	_, err := r.op(ctx, "POST", id, "/timeout", durationBody{MS: timeout.Milliseconds()})
	return err
}

// Refresh forwards a refresh.
func (r *RemoteNode) Refresh(ctx context.Context, id string, d time.Duration) error {
	_, err := r.op(ctx, "POST", id, "/refresh", durationBody{MS: d.Milliseconds()})
	return err
}

// SetNetwork forwards an egress policy change.
func (r *RemoteNode) SetNetwork(ctx context.Context, id string, allowInternet *bool, nw store.Network) error {
	_, err := r.op(ctx, "POST", id, "/network", networkBody{AllowInternet: allowInternet, Network: nw})
	return err
}

// Stats forwards a stats read.
func (r *RemoteNode) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	var st runtime.Stats
	err := r.call(ctx, "GET", sbPath(id, "/stats"), nil, &st)
	return st, err
}

// Metrics forwards a read of the sandbox's sampled metrics history.
func (r *RemoteNode) Metrics(ctx context.Context, id string, start, end time.Time) ([]runtime.Stats, error) {
	q := url.Values{}
	q.Set("start", start.UTC().Format(time.RFC3339Nano))
	q.Set("end", end.UTC().Format(time.RFC3339Nano))
	var out []runtime.Stats
	err := r.call(ctx, "GET", sbPath(id, "/metrics?"+q.Encode()), nil, &out)
	return out, err
}

// Snapshot forwards a snapshot.
func (r *RemoteNode) Snapshot(ctx context.Context, id, snapshotID string) (runtime.Snapshot, error) {
	var snap runtime.Snapshot
	err := r.call(ctx, "POST", sbPath(id, "/snapshots"), snapshotBody{SnapshotID: snapshotID}, &snap)
	return snap, err
}

// DeleteSnapshot forwards a snapshot deletion.
func (r *RemoteNode) DeleteSnapshot(ctx context.Context, snapshotID string) error {
	return r.call(ctx, "DELETE", "/node/v1/snapshots/"+url.PathEscape(snapshotID), nil, nil)
}

// Dial opens a stream to port in the sandbox through the node API's dial
// upgrade.
func (r *RemoteNode) Dial(ctx context.Context, id string, port int, allowResume bool) (net.Conn, error) {
	if _, err := r.Get(id); err != nil {
		return nil, err
	}
	addr := r.Address()
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &errs.Error{Kind: errs.Unavailable, Err: err, Msg: fmt.Sprintf("node %s is unreachable", r.id)}
	}
	resume := "0"
	if allowResume {
		resume = "1"
	}
	req, _ := http.NewRequest("GET", "http://"+addr+sbPath(id, "/dial")+"?port="+fmt.Sprint(port)+"&resume="+resume, nil)
	req.Header.Set("Authorization", "Bearer "+r.c.cfg.Token)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", dialUpgrade)
	// The handshake is bounded by ctx (the node retries refused
	// connections for a short grace period before answering).
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := req.Write(c); err != nil {
		c.Close()
		return nil, &errs.Error{Kind: errs.Unavailable, Err: err, Msg: fmt.Sprintf("node %s is unreachable", r.id)}
	}
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, req)
	if err != nil {
		c.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, &errs.Error{Kind: errs.Unavailable, Err: err, Msg: fmt.Sprintf("node %s is unreachable", r.id)}
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		b, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		c.Close()
		return nil, decodeErr(res.StatusCode, b)
	}
	if !stop() {
		c.Close()
		return nil, ctx.Err()
	}
	return &bufConn{Conn: c, r: br}, nil
}

// bufConn reads through the reader that parsed the handshake.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// CloseWrite half-closes the TCP connection.
func (c *bufConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
