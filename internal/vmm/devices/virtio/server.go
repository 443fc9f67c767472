package virtio

import "sync/atomic"

// Server gives a device Activate, Reset and QueueNotify when each of its
// queues is served synchronously, one Handler per queue (nil: ignored).
// Devices embed it and implement only identity, config and handlers.
type Server struct {
	handlers []Handler
	a        atomic.Pointer[Active]
}

// NewServer returns a Server with one handler per queue.
func NewServer(handlers ...Handler) *Server { return &Server{handlers: handlers} }

// Activate implements Device.
func (s *Server) Activate(a *Active) error { s.a.Store(a); return nil }

// Reset implements Device.
func (s *Server) Reset() { s.a.Store(nil) }

// Active returns the activation, or nil when the device is not active.
func (s *Server) Active() *Active { return s.a.Load() }

// QueueNotify implements Device: it drains queue q with its handler.
func (s *Server) QueueNotify(q int) {
	a := s.a.Load()
	if a == nil || q < 0 || q >= len(s.handlers) || q >= len(a.Queues) || s.handlers[q] == nil {
		return
	}
	a.Queues[q].Drain(s.handlers[q])
}
