//go:build linux

// Package listen opens cube-agent's listeners: TCP and, inside a microVM,
// AF_VSOCK on the same port numbers (the host reaches the agent through
// the VMM's vsock device).
package listen

import (
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/cubesandbox/cube/internal/errs"
)

// All listens on tcp (if non-empty; "unix:/path" for a Unix socket) and on vsock port vport when withVsock
// and /dev/vsock exists. A vsock failure is not fatal when TCP works.
func All(tcp string, vport uint32, withVsock bool) ([]net.Listener, error) {
	var out []net.Listener
	if path, ok := strings.CutPrefix(tcp, "unix:"); ok {
		_ = os.Remove(path)
		l, err := net.Listen("unix", path)
		if err != nil {
			return nil, errs.Wrap(errs.Unavailable, err, "listen on %s", tcp)
		}
		out = append(out, l)
	} else if tcp != "" {
		l, err := net.Listen("tcp", tcp)
		if err != nil {
			return nil, errs.Wrap(errs.Unavailable, err, "listen on %s", tcp)
		}
		out = append(out, l)
	}
	if withVsock && vport != 0 {
		if _, err := os.Stat("/dev/vsock"); err == nil {
			if l, err := vsock.Listen(vport, nil); err == nil {
				out = append(out, l)
			} else if len(out) == 0 {
				return nil, errs.Wrap(errs.Unavailable, err, "listen on vsock port %d", vport)
			}
		}
	}
	if len(out) == 0 {
		return nil, errs.E(errs.InvalidArgument, "no listener configured")
	}
	return out, nil
}

// NewHTTPServer serves h over HTTP/1.1 and cleartext HTTP/2 (h2c), with
// no write timeout: envd streams live as long as their commands.
func NewHTTPServer(h http.Handler) *http.Server {
	s := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       10 * time.Minute,
		MaxHeaderBytes:    1 << 20,
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	s.Protocols = &p
	return s
}
