package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/store"
)

// NodeServer is the node API a control calls (/node/v1/...), served by
// `cube node` on its own port. Every route needs the cluster token.
type NodeServer struct {
	n       *node.Node
	log     *slog.Logger
	handler http.Handler
}

// durationBody carries a duration in milliseconds.
type durationBody struct {
	MS int64 `json:"ms"`
}

func (b durationBody) d() time.Duration { return time.Duration(b.MS) * time.Millisecond }

type networkBody struct {
	AllowInternet *bool         `json:"allowInternet"`
	Network       store.Network `json:"network"`
}

type connectReply struct {
	Sandbox *store.Sandbox `json:"sandbox"`
	Resumed bool           `json:"resumed"`
}

type snapshotBody struct {
	SnapshotID string `json:"snapshotID"`
}

// dialUpgrade is the Upgrade token of the dial route.
const dialUpgrade = "cube-tcp"

// NewNodeServer returns the node API over n.
func NewNodeServer(n *node.Node, token string, log *slog.Logger) *NodeServer {
	s := &NodeServer{n: n, log: log.With("component", "nodeapi")}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /node/v1/sandboxes", s.create)
	mux.HandleFunc("GET /node/v1/sandboxes/{id}", s.get)
	mux.HandleFunc("DELETE /node/v1/sandboxes/{id}", s.op(func(ctx context.Context, id string, r *http.Request) error {
		return n.Kill(ctx, id)
	}))
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/pause", s.op(func(ctx context.Context, id string, r *http.Request) error {
		return n.Pause(ctx, id)
	}))
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/resume", s.op(func(ctx context.Context, id string, r *http.Request) error {
		var b durationBody
		if err := readJSON(r, &b); err != nil {
			return err
		}
		_, err := n.Resume(ctx, id, b.d())
		return err
	}))
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/timeout", s.op(func(ctx context.Context, id string, r *http.Request) error {
		var b durationBody
		if err := readJSON(r, &b); err != nil {
			return err
		}
		return n.SetTimeout(ctx, id, b.d())
	}))
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/refresh", s.op(func(ctx context.Context, id string, r *http.Request) error {
		var b durationBody
		if err := readJSON(r, &b); err != nil {
			return err
		}
		return n.Refresh(ctx, id, b.d())
	}))
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/network", s.op(func(ctx context.Context, id string, r *http.Request) error {
		var b networkBody
		if err := readJSON(r, &b); err != nil {
			return err
		}
		return n.SetNetwork(ctx, id, b.AllowInternet, b.Network)
	}))
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/connect", s.connect)
	mux.HandleFunc("GET /node/v1/sandboxes/{id}/stats", s.stats)
	mux.HandleFunc("GET /node/v1/sandboxes/{id}/metrics", s.metrics)
	mux.HandleFunc("POST /node/v1/sandboxes/{id}/snapshots", s.snapshot)
	mux.HandleFunc("DELETE /node/v1/snapshots/{id}", s.deleteSnapshot)
	mux.HandleFunc("GET /node/v1/sandboxes/{id}/dial", s.dial)
	s.handler = requireToken(token, mux)
	return s
}

// Handler serves the node API.
func (s *NodeServer) Handler() http.Handler { return s.handler }

// record answers the node's stored record of id (any state).
func (s *NodeServer) record(w http.ResponseWriter, ctx context.Context, id string) {
	sb, err := s.n.Get(id)
	if err != nil {
		sb, err = s.n.Store().GetSandbox(ctx, id)
	}
	if err != nil || sb.NodeID != s.n.ID() {
		writeErr(w, errs.E(errs.NotFound, "sandbox %q not found", id))
		return
	}
	writeJSON(w, http.StatusOK, sb)
}

func (s *NodeServer) create(w http.ResponseWriter, r *http.Request) {
	var req node.CreateRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, err)
		return
	}
	if req.ID == "" || req.Template == nil || req.Timeout <= 0 {
		writeErr(w, errs.E(errs.InvalidArgument, "create needs an id, a template and a timeout"))
		return
	}
	sb, err := s.n.Create(r.Context(), req)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, sb)
}

func (s *NodeServer) get(w http.ResponseWriter, r *http.Request) {
	s.record(w, r.Context(), r.PathValue("id"))
}

// op runs f on the sandbox in the path and answers its record after it.
func (s *NodeServer) op(f func(ctx context.Context, id string, r *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if err := f(r.Context(), id, r); err != nil {
			writeErr(w, err)
			return
		}
		s.record(w, r.Context(), id)
	}
}

func (s *NodeServer) connect(w http.ResponseWriter, r *http.Request) {
	var b durationBody
	if err := readJSON(r, &b); err != nil {
		writeErr(w, err)
		return
	}
	sb, resumed, err := s.n.Connect(r.Context(), r.PathValue("id"), b.d())
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, connectReply{Sandbox: sb, Resumed: resumed})
}

func (s *NodeServer) stats(w http.ResponseWriter, r *http.Request) {
	st, err := s.n.Stats(r.Context(), r.PathValue("id"))
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *NodeServer) metrics(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	start, err1 := time.Parse(time.RFC3339Nano, q.Get("start"))
	end, err2 := time.Parse(time.RFC3339Nano, q.Get("end"))
	if err1 != nil || err2 != nil {
		writeErr(w, errs.E(errs.InvalidArgument, "start and end must be RFC 3339 times"))
		return
	}
	ms, err := s.n.Metrics(r.Context(), r.PathValue("id"), start, end)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, ms)
}

func (s *NodeServer) snapshot(w http.ResponseWriter, r *http.Request) {
	var b snapshotBody
	if err := readJSON(r, &b); err != nil {
		writeErr(w, err)
		return
	}
	if b.SnapshotID == "" {
		writeErr(w, errs.E(errs.InvalidArgument, "snapshotID is required"))
		return
	}
	id := r.PathValue("id")
	snap, err := s.n.Snapshot(r.Context(), id, b.SnapshotID)
	if err != nil {
		writeErr(w, err)
		return
	}
	// The control records the snapshot (owner, names); the node keeps a
	// record too, so that its start-up sweep (node.SweepSnapshots) does
	// not take the snapshot for an interrupted one's leftover.
	if sb, err := s.n.Get(id); err == nil {
		rec := &store.Snapshot{ID: b.SnapshotID, KeyID: sb.KeyID, SandboxID: id, TemplateID: sb.TemplateID, NodeID: s.n.ID()}
		if err := s.n.Store().CreateSnapshot(context.WithoutCancel(r.Context()), rec); err != nil {
			s.log.Warn("record snapshot on the node", "snapshot", b.SnapshotID, "err", err)
		}
	}
	writeJSON(w, http.StatusOK, snap)
}

func (s *NodeServer) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := s.n.DeleteSnapshot(r.Context(), id); err != nil {
		writeErr(w, err)
		return
	}
	ctx := context.WithoutCancel(r.Context())
	if recs, err := s.n.Store().NodeSnapshots(ctx, s.n.ID()); err == nil {
		for _, rec := range recs {
			if rec.ID == id {
				s.n.Store().DeleteSnapshot(ctx, rec.KeyID, rec.ID)
			}
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

// dial connects to ?port= in the sandbox and, on success, answers 101 and
// relays bytes both ways on the hijacked connection.
func (s *NodeServer) dial(w http.ResponseWriter, r *http.Request) {
	port, err := strconv.Atoi(r.URL.Query().Get("port"))
	if err != nil || port <= 0 || port > 65535 {
		writeErr(w, errs.E(errs.InvalidArgument, "port must be 1..65535"))
		return
	}
	if r.Header.Get("Upgrade") != dialUpgrade {
		writeErr(w, errs.E(errs.InvalidArgument, "dial needs Upgrade: %s", dialUpgrade))
		return
	}
	up, err := s.n.Dial(r.Context(), r.PathValue("id"), port, r.URL.Query().Get("resume") == "1")
	if err != nil {
		writeErr(w, err)
		return
	}
	c, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		up.Close()
		writeErr(w, errs.Wrap(errs.Internal, err, "hijack"))
		return
	}
	fmt.Fprintf(rw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n", dialUpgrade)
	if err := rw.Flush(); err != nil {
		c.Close()
		up.Close()
		return
	}
	// Bytes the client sent after its request are in rw.Reader.
	go relay(up, c, rw.Reader)
}

// relay copies a<->b (from b via br) until both directions end; a finished
// direction half-closes its writer where it can.
func relay(a, b net.Conn, br io.Reader) {
	done := make(chan struct{}, 2)
	cp := func(dst net.Conn, src io.Reader) {
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
		done <- struct{}{}
	}
	go cp(a, br)
	go cp(b, a)
	<-done
	<-done
	a.Close()
	b.Close()
}
