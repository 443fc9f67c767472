package vmmapi

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// Controller is what the server drives (implemented by `cube vmm`).
type Controller interface {
	Start() error
	Pause() error
	Resume() error
	Stop() error
	Status() Status
	Metrics() Metrics
	// VCPUs reads every vCPU's registers (debugging).
	VCPUs() ([]VCPURegs, error)
}

// Snapshotter is implemented by controllers that take snapshots and
// restore them (package vmm/snapshot; issue 7).
type Snapshotter interface {
	Snapshot(SnapshotRequest) (SnapshotReply, error)
	Restore(RestoreRequest) (RestoreReply, error)
}

// Server serves the control protocol.
type Server struct {
	ctl  Controller
	log  *slog.Logger
	http *http.Server
	// stopped is closed after a /stop reply was written.
	stopped chan struct{}
}

// NewServer returns a server for ctl.
func NewServer(ctl Controller, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{ctl: ctl, log: log, stopped: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) { reply(w, ctl.Status()) })
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) { reply(w, ctl.Metrics()) })
	mux.HandleFunc("GET /debug/vcpus", func(w http.ResponseWriter, r *http.Request) {
		v, err := ctl.VCPUs()
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, v)
	})
	mux.HandleFunc("POST /start", s.action(ctl.Start))
	mux.HandleFunc("POST /pause", s.action(ctl.Pause))
	mux.HandleFunc("POST /resume", s.action(ctl.Resume))
	mux.HandleFunc("POST /stop", s.action(ctl.Stop))
	if sn, ok := ctl.(Snapshotter); ok {
		mux.HandleFunc("POST /snapshot", func(w http.ResponseWriter, r *http.Request) {
			var req SnapshotRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				replyErr(w, errs.Wrap(errs.InvalidArgument, err, "snapshot request"))
				return
			}
			rep, err := sn.Snapshot(req)
			if err != nil {
				replyErr(w, err)
				return
			}
			reply(w, rep)
		})
		mux.HandleFunc("POST /restore", func(w http.ResponseWriter, r *http.Request) {
			var req RestoreRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				replyErr(w, errs.Wrap(errs.InvalidArgument, err, "restore request"))
				return
			}
			rep, err := sn.Restore(req)
			if err != nil {
				replyErr(w, err)
				return
			}
			reply(w, rep)
		})
	} else {
		unimpl := func(w http.ResponseWriter, r *http.Request) {
			replyErr(w, errs.E(errs.Unimplemented, "%s is not supported by this VMM", r.URL.Path))
		}
		mux.HandleFunc("POST /snapshot", unimpl)
		mux.HandleFunc("POST /restore", unimpl)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		replyErr(w, errs.E(errs.NotFound, "no such endpoint %s %s", r.Method, r.URL.Path))
	})
	s.http = &http.Server{Handler: http.MaxBytesHandler(mux, 1<<16), ReadHeaderTimeout: 5 * time.Second}
	return s
}

func (s *Server) action(f func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := f(); err != nil {
			replyErr(w, err)
			return
		}
		reply(w, s.ctl.Status())
	}
}

// Serve serves on l until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	err := s.http.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown lets in-flight replies finish, then closes.
func (s *Server) Shutdown(ctx context.Context) error { return s.http.Shutdown(ctx) }

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func replyErr(w http.ResponseWriter, err error) {
	var b ErrorBody
	k := errs.KindOf(err)
	b.Error.Kind = k.String()
	b.Error.Message = errs.Message(err)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(errs.HTTPStatus(k))
	_ = json.NewEncoder(w).Encode(b)
}
