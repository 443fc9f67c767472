// Package runtimetest provides Fake, an in-memory runtime.Runtime for unit
// tests of the layers above the runtime (node, API, proxy). It runs no
// sandbox: it keeps the contract's bookkeeping (NotFound for unknown ids,
// Conflict for an operation in the wrong state, AlreadyExists for a reused
// id, idempotent Destroy) and answers Dial with an in-process connection
// served by an http.Handler the test chooses. With a state directory its
// sandboxes survive a restart of the process, as runsc sandboxes do, so
// crash/re-adopt logic can be tested across real processes.
package runtimetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
)

// Fake is an in-memory runtime. Zero-value fields have sensible defaults;
// set hooks before use.
type Fake struct {
	// Handler serves Dial(id, port) connections; nil or a nil result means
	// nothing listens on that port (connection refused).
	Handler func(id string, port int) http.Handler
	// CreateDelay, if set, is slept inside Create (honouring ctx).
	CreateDelay time.Duration
	// FailCreate, if set, makes Create fail with its error.
	FailCreate func(spec runtime.CreateSpec) error

	mu        sync.Mutex
	dir       string
	templates map[string]runtime.Template
	sbs       map[string]*runtime.Info
	snaps     map[string]runtime.Snapshot
	calls     map[string]int
	conns     map[string][]*pipeConn // server sides of Dial connections, by sandbox
	srv       *http.Server
	ln        *pipeListener
}

type persisted struct {
	Templates map[string]runtime.Template `json:"templates"`
	Sandboxes map[string]*runtime.Info    `json:"sandboxes"`
	Snapshots map[string]runtime.Snapshot `json:"snapshots"`
}

// New returns a Fake. If dir is not empty its state is loaded from and
// saved to dir/fake-runtime.json.
func New(dir string) (*Fake, error) {
	f := &Fake{
		dir:       dir,
		templates: map[string]runtime.Template{},
		sbs:       map[string]*runtime.Info{},
		snaps:     map[string]runtime.Snapshot{},
		calls:     map[string]int{},
		conns:     map[string][]*pipeConn{},
	}
	if dir != "" {
		b, err := os.ReadFile(filepath.Join(dir, "fake-runtime.json"))
		if err == nil {
			var p persisted
			if err := json.Unmarshal(b, &p); err != nil {
				return nil, err
			}
			for k, v := range p.Templates {
				f.templates[k] = v
			}
			for k, v := range p.Sandboxes {
				f.sbs[k] = v
			}
			for k, v := range p.Snapshots {
				f.snaps[k] = v
			}
		} else if !os.IsNotExist(err) {
			return nil, err
		}
	}
	f.ln = &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
	f.srv = &http.Server{
		Handler: http.HandlerFunc(f.serve),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(*pipeConn); ok {
				ctx = context.WithValue(ctx, targetKey{}, pc.target)
			}
			return ctx
		},
	}
	go f.srv.Serve(f.ln)
	return f, nil
}

type targetKey struct{}

type target struct {
	id   string
	port int
}

func (f *Fake) serve(w http.ResponseWriter, r *http.Request) {
	t, _ := r.Context().Value(targetKey{}).(target)
	h := f.handler(t.id, t.port)
	if h == nil {
		http.Error(w, "no handler", http.StatusInternalServerError)
		return
	}
	h.ServeHTTP(w, r)
}

func (f *Fake) handler(id string, port int) http.Handler {
	if f.Handler == nil {
		return nil
	}
	return f.Handler(id, port)
}

// save writes the state (caller holds mu).
func (f *Fake) save() {
	if f.dir == "" {
		return
	}
	b, _ := json.Marshal(persisted{Templates: f.templates, Sandboxes: f.sbs, Snapshots: f.snaps})
	tmp := filepath.Join(f.dir, "fake-runtime.json.tmp")
	if os.WriteFile(tmp, b, 0o600) == nil {
		os.Rename(tmp, filepath.Join(f.dir, "fake-runtime.json"))
	}
}

// Calls returns how many times method was called.
func (f *Fake) Calls(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[method]
}

// Snapshots returns the ids of the snapshots the fake keeps.
func (f *Fake) Snapshots() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]string, 0, len(f.snaps))
	for id := range f.snaps {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// Adopt inserts a sandbox as if a previous process had left it running
// (orphan tests).
func (f *Fake) Adopt(info runtime.Info) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := info
	f.sbs[info.ID] = &i
	f.save()
}

// Forget drops a sandbox without a trace (a runtime that lost it).
func (f *Fake) Forget(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.sbs, id)
	f.save()
}

func (f *Fake) Name() string { return "fake" }

func (f *Fake) BakeTemplate(ctx context.Context, t runtime.Template) error {
	if t.ID == "" {
		return errs.E(errs.InvalidArgument, "template id is empty")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["BakeTemplate"]++
	f.templates[t.ID] = t
	f.save()
	return nil
}

func (f *Fake) DeleteTemplate(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.templates[id]; !ok {
		return errs.E(errs.NotFound, "template %q not found", id)
	}
	delete(f.templates, id)
	f.save()
	return nil
}

func (f *Fake) Create(ctx context.Context, spec runtime.CreateSpec) (runtime.Info, error) {
	f.mu.Lock()
	f.calls["Create"]++
	_, tplOK := f.templates[spec.TemplateID]
	_, snapOK := f.snaps[spec.SnapshotID]
	_, exists := f.sbs[spec.ID]
	f.mu.Unlock()
	switch {
	case spec.ID == "":
		return runtime.Info{}, errs.E(errs.InvalidArgument, "sandbox id is empty")
	case spec.SnapshotID != "" && !snapOK:
		return runtime.Info{}, errs.E(errs.NotFound, "snapshot %q not found", spec.SnapshotID)
	case spec.SnapshotID == "" && !tplOK:
		return runtime.Info{}, errs.E(errs.NotFound, "template %q not baked", spec.TemplateID)
	case exists:
		return runtime.Info{}, errs.E(errs.AlreadyExists, "sandbox %q exists", spec.ID)
	}
	if f.CreateDelay > 0 {
		select {
		case <-time.After(f.CreateDelay):
		case <-ctx.Done():
			return runtime.Info{}, ctx.Err()
		}
	}
	if f.FailCreate != nil {
		if err := f.FailCreate(spec); err != nil {
			return runtime.Info{}, err
		}
	}
	info := runtime.Info{ID: spec.ID, TemplateID: spec.TemplateID, State: runtime.StateRunning, StartedAt: time.Now().UTC(),
		Net: spec.Net, Resources: spec.Resources, Labels: spec.Labels}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.sbs[spec.ID]; ok {
		return runtime.Info{}, errs.E(errs.AlreadyExists, "sandbox %q exists", spec.ID)
	}
	i := info
	f.sbs[spec.ID] = &i
	f.save()
	return info, nil
}

func (f *Fake) get(id string) (*runtime.Info, error) {
	sb, ok := f.sbs[id]
	if !ok {
		return nil, errs.E(errs.NotFound, "sandbox %q not found", id)
	}
	return sb, nil
}

func (f *Fake) Pause(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["Pause"]++
	sb, err := f.get(id)
	if err != nil {
		return err
	}
	if sb.State != runtime.StateRunning {
		return errs.E(errs.Conflict, "sandbox %q is %s", id, sb.State)
	}
	sb.State = runtime.StatePaused
	f.freeze(id)
	f.save()
	return nil
}

// freeze makes the open connections of sandbox id go silent, as those of
// a checkpointed process do: they stay open but never answer again.
// Caller holds mu.
func (f *Fake) freeze(id string) {
	for _, c := range f.conns[id] {
		c.freeze()
	}
	delete(f.conns, id)
}

func (f *Fake) Resume(ctx context.Context, id string, n runtime.NetSlot) (runtime.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["Resume"]++
	sb, err := f.get(id)
	if err != nil {
		return runtime.Info{}, err
	}
	if sb.State != runtime.StatePaused {
		return runtime.Info{}, errs.E(errs.Conflict, "sandbox %q is %s", id, sb.State)
	}
	sb.State = runtime.StateRunning
	sb.Net = n
	f.save()
	return *sb, nil
}

func (f *Fake) Snapshot(ctx context.Context, id, snapshotID string) (runtime.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["Snapshot"]++
	sb, err := f.get(id)
	if err != nil {
		return runtime.Snapshot{}, err
	}
	if sb.State != runtime.StateRunning {
		return runtime.Snapshot{}, errs.E(errs.Conflict, "sandbox %q is %s", id, sb.State)
	}
	if _, ok := f.snaps[snapshotID]; ok {
		return runtime.Snapshot{}, errs.E(errs.AlreadyExists, "snapshot %q exists", snapshotID)
	}
	s := runtime.Snapshot{ID: snapshotID, SandboxID: id, TemplateID: sb.TemplateID, CreatedAt: time.Now().UTC()}
	f.snaps[snapshotID] = s
	f.save()
	return s, nil
}

// ListSnapshots implements runtime.SnapshotLister (every snapshot of the
// fake is complete).
func (f *Fake) ListSnapshots(ctx context.Context) ([]runtime.SnapshotEntry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]runtime.SnapshotEntry, 0, len(f.snaps))
	for id := range f.snaps {
		out = append(out, runtime.SnapshotEntry{ID: id, Complete: true})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func (f *Fake) DeleteSnapshot(ctx context.Context, snapshotID string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["DeleteSnapshot"]++
	if _, ok := f.snaps[snapshotID]; !ok {
		return errs.E(errs.NotFound, "snapshot %q not found", snapshotID)
	}
	delete(f.snaps, snapshotID)
	f.save()
	return nil
}

func (f *Fake) Destroy(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["Destroy"]++
	delete(f.sbs, id)
	f.freeze(id)
	f.save()
	return nil
}

// ErrRefused is what Dial returns when nothing listens on the port.
var ErrRefused = errors.New("connection refused")

func (f *Fake) Dial(ctx context.Context, id string, port int) (net.Conn, error) {
	f.mu.Lock()
	sb, err := f.get(id)
	var state runtime.State
	if err == nil {
		state = sb.State
	}
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if state != runtime.StateRunning {
		return nil, errs.E(errs.Conflict, "sandbox %q is %s", id, state)
	}
	if port <= 0 || port > 65535 {
		return nil, errs.E(errs.InvalidArgument, "port %d out of range", port)
	}
	if f.handler(id, port) == nil {
		return nil, errs.Wrap(errs.Unavailable, ErrRefused, "dial %s port %d", id, port)
	}
	c1, c2 := net.Pipe()
	pc := &pipeConn{Conn: c2, target: target{id, port}, frozen: make(chan struct{}), closed: make(chan struct{})}
	f.mu.Lock()
	f.conns[id] = append(f.conns[id], pc)
	f.mu.Unlock()
	select {
	case f.ln.conns <- pc:
	case <-f.ln.done:
		return nil, errs.E(errs.Unavailable, "runtime closed")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return c1, nil
}

func (f *Fake) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	sb, err := f.get(id)
	if err != nil {
		return runtime.Stats{}, err
	}
	if sb.State != runtime.StateRunning {
		return runtime.Stats{}, errs.E(errs.Conflict, "sandbox %q is %s", id, sb.State)
	}
	return runtime.Stats{Timestamp: time.Now().UTC(), CPUCount: max(sb.Resources.CPUCount, 1), CPUUsedPct: 1.5,
		MemUsed: 64 << 20, MemTotal: uint64(max(sb.Resources.MemoryMB, 1)) << 20, DiskUsed: 1 << 20, DiskTotal: uint64(max(sb.Resources.DiskMB, 1)) << 20}, nil
}

func (f *Fake) List(ctx context.Context) ([]runtime.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]runtime.Info, 0, len(f.sbs))
	for _, sb := range f.sbs {
		out = append(out, *sb)
	}
	return out, nil
}

// Close stops serving Dial connections; sandboxes stay (as the contract
// says).
func (f *Fake) Close() error {
	f.ln.Close()
	return f.srv.Close()
}

var _ runtime.Runtime = (*Fake)(nil)

type pipeConn struct {
	net.Conn
	target    target
	once      sync.Once
	frozen    chan struct{}
	closeOnce sync.Once
	closed    chan struct{}
}

func (c *pipeConn) freeze() { c.once.Do(func() { close(c.frozen) }) }

// Read swallows whatever arrives once the connection is frozen and then
// blocks until it is closed: the peer sees a connection that never answers.
func (c *pipeConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	select {
	case <-c.frozen:
		<-c.closed
		return 0, io.EOF
	default:
	}
	return n, err
}

// Write of a frozen connection is swallowed.
func (c *pipeConn) Write(b []byte) (int, error) {
	select {
	case <-c.frozen:
		return len(b), nil
	default:
	}
	return c.Conn.Write(b)
}

func (c *pipeConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

type pipeListener struct {
	conns chan net.Conn
	once  sync.Once
	done  chan struct{}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "fake-runtime" }

// EnvdLike is a handler for tests that behaves like the agent where the
// layers above care: GET /health answers 204; /echo streams the request
// body back; /stream?n=N writes N lines, flushing each, 20 ms apart;
// /who answers "<id>:<port>"; an Upgrade: websocket request is switched
// (101) and then echoes raw bytes.
func EnvdLike(id string, port int) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/who", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s:%d", id, port)
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		http.NewResponseController(w).EnableFullDuplex()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				w.Write(buf[:n])
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		for i := 0; i < n; i++ {
			if _, err := fmt.Fprintf(w, "line %d\n", i); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-time.After(20 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want upgrade", http.StatusBadRequest)
			return
		}
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		rw.Flush()
		io.Copy(c, rw)
	})
	return mux
}
