// Package cluster splits cube into a control plane and node agents.
//
// The control (`cube server --role=control`) runs the REST API, the proxy,
// the scheduler (internal/master) and the store (PostgreSQL or SQLite);
// it runs no sandbox. Each node (`cube node --join URL`) runs the runtime,
// its pools and networking and an internal/node.Node with a store of its
// own (SQLite in its data dir), and serves the node API (NodeServer) on a
// port of its own (:3001 by default). Every call either way carries the
// shared cluster token (Authorization: Bearer); a call without it is
// refused with 401.
//
//	node  --POST /cluster/v1/heartbeat-->  control   (every HeartbeatInterval:
//	                                                  id, address, capacity,
//	                                                  free, live sandboxes,
//	                                                  templates, new events)
//	control --/node/v1/...-------------->  node      (create, kill, pause,
//	                                                  resume, connect,
//	                                                  timeouts, network,
//	                                                  stats, snapshots, dial)
//
// The control keeps one RemoteNode per node (a master.Node): it forwards
// lifecycle calls, answers Get from the records the node reported, and
// mirrors every record it learns into the control's store, which the API
// lists from. A node silent for DownAfter is marked down: it gets no new
// sandboxes and its sandboxes are recorded failed ("node N is down") and
// no longer routed; if it comes back its heartbeat restores them.
// Sandbox data-plane traffic reaches the node through Dial: an HTTP
// upgrade on the node API that turns the connection into a raw TCP
// stream to the sandbox port.
package cluster

import (
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/store"
)

// Defaults of the timings.
const (
	DefaultHeartbeat = 2 * time.Second
	DefaultDownAfter = 3 * DefaultHeartbeat
)

// Report is a node's registration and heartbeat: everything the control
// needs to schedule onto it and to list its sandboxes.
type Report struct {
	ID        string            `json:"id"`
	Address   string            `json:"address"` // host:port of the node API
	Runtime   string            `json:"runtime"`
	Capacity  int               `json:"capacity"`
	Free      int               `json:"free"`
	Sandboxes []*store.Sandbox  `json:"sandboxes"` // live ones
	Templates []*store.Template `json:"templates"`
	// Events are the node's sandbox events after the last cursor the
	// control acknowledged (at most maxEvents), oldest first.
	Events []*store.Event `json:"events,omitempty"`
}

// ReportReply answers a Report.
type ReportReply struct {
	HeartbeatMS int64 `json:"heartbeatMs"`
	// EventCursor is the id of the newest event of this node the control
	// has recorded ("" if it does not know): the node ships events after
	// it next time.
	EventCursor string `json:"eventCursor,omitempty"`
}

// maxEvents bounds the events of one report.
const maxEvents = 500

// wireError is the body of every error answer of both APIs.
type wireError struct {
	Kind         string `json:"kind"`
	Message      string `json:"message"`
	RetryAfterMS int64  `json:"retryAfterMs,omitempty"`
}

var kindByName = func() map[string]errs.Kind {
	m := map[string]errs.Kind{}
	for k := errs.Internal; k <= errs.FailedPrecondition; k++ {
		m[k.String()] = k
	}
	return m
}()

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	k := errs.KindOf(err)
	writeJSON(w, errs.HTTPStatus(k), wireError{Kind: k.String(), Message: errs.Message(err),
		RetryAfterMS: errs.RetryAfterOf(err).Milliseconds()})
}

// decodeErr turns an error answer back into an *errs.Error of the same
// kind.
func decodeErr(status int, body []byte) error {
	var we wireError
	if err := json.Unmarshal(body, &we); err != nil || we.Kind == "" {
		return errs.E(errs.Internal, "node answered %d", status)
	}
	k, ok := kindByName[we.Kind]
	if !ok {
		k = errs.Internal
	}
	return &errs.Error{Kind: k, Msg: we.Message, RetryAfter: time.Duration(we.RetryAfterMS) * time.Millisecond}
}

// authorized reports whether r carries the cluster token. An empty token
// never authorizes (a cluster must be configured with one).
func authorized(r *http.Request, token string) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	return ok && token != "" && subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
}

// requireToken wraps h: calls without the cluster token get 401.
func requireToken(token string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !authorized(r, token) {
			writeErr(w, errs.E(errs.Unauthenticated, "missing or invalid cluster token"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// maxBody bounds request bodies of both APIs.
const maxBody = 8 << 20

func readJSON(r *http.Request, v any) error {
	if r.Body == nil {
		return errs.E(errs.InvalidArgument, "empty body")
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxBody))
	if err := dec.Decode(v); err != nil {
		return errs.Wrap(errs.InvalidArgument, err, "bad request body")
	}
	return nil
}
