//go:build linux

// Package envd is cube-agent's E2B-compatible envd API (port 49983):
// Connect RPC services process.Process and filesystem.Filesystem (JSON and
// binary codecs, unary and server streaming), and the plain HTTP endpoints
// /files, /health, /init, /envs, /metrics and /start (the template's start
// command, startcmd.go). See docs/agent.md.
package envd

import (
	"crypto/subtle"
	"encoding/json"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/proto/filesystem/filesystemconnect"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// Version is the envd API version the agent implements (reported by the
// control plane as envdVersion; it gates SDK features).
const Version = "0.6.13"

// MaxMessageBytes bounds one Connect request message.
const MaxMessageBytes = 16 << 20

// Options configure a Server.
type Options struct {
	Logger *slog.Logger
	// DefaultUser runs requests that name no user ("root" if empty).
	DefaultUser string
	// DefaultWorkdir is the cwd of processes that name none ("" = home).
	DefaultWorkdir string
	// AccessToken, if set, is required as X-Access-Token.
	AccessToken string
	// EnvVars are added to every process's environment.
	EnvVars map[string]string
	// ManageClock lets /init step the system clock (PID 1 in a VM only:
	// never on a shared host).
	ManageClock bool
}

// Server is the envd API. Create with New; serve Handler().
type Server struct {
	log   *slog.Logger
	procs *processTable
	watch *watcherTable

	mu          sync.RWMutex
	defaultUser string
	workdir     string
	token       string
	envs        map[string]string
	manageClock bool

	startCmd startCmd // the template's start command (startcmd.go)

	handler http.Handler
}

// New builds a Server.
func New(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.DefaultUser == "" {
		o.DefaultUser = "root"
	}
	s := &Server{
		log:         o.Logger,
		procs:       newProcessTable(),
		watch:       newWatcherTable(),
		defaultUser: o.DefaultUser,
		workdir:     o.DefaultWorkdir,
		token:       o.AccessToken,
		envs:        maps.Clone(o.EnvVars),
		manageClock: o.ManageClock,
	}
	if s.envs == nil {
		s.envs = map[string]string{}
	}
	opts := []connect.HandlerOption{connect.WithReadMaxBytes(MaxMessageBytes)}
	mux := http.NewServeMux()
	mux.Handle(processconnect.NewProcessHandler(&processService{s: s}, opts...))
	mux.Handle(filesystemconnect.NewFilesystemHandler(&filesystemService{s: s}, opts...))
	mux.HandleFunc("GET /health", s.handleHealth)
	mux.HandleFunc("GET /files", s.handleFilesGet)
	mux.HandleFunc("POST /files", s.handleFilesPost)
	mux.HandleFunc("POST /init", s.handleInit)
	mux.HandleFunc("GET /envs", s.handleEnvs)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("GET /start", s.handleStart)
	s.handler = s.middleware(mux)
	return s
}

// Handler is the HTTP handler of the whole envd API.
func (s *Server) Handler() http.Handler { return s.handler }

// Close kills every process the server started and stops watchers.
func (s *Server) Close() {
	s.procs.killAll()
	s.watch.closeAll()
}

func (s *Server) currentToken() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.token
}

func (s *Server) envVars() map[string]string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return maps.Clone(s.envs)
}

// resolveUser returns the named user, or the default user for "".
func (s *Server) resolveUser(name string) (*User, error) {
	if name == "" {
		s.mu.RLock()
		name = s.defaultUser
		s.mu.RUnlock()
	}
	return LookupUser(name)
}

// userFromHeader resolves the user selected by Basic authorization.
func (s *Server) userFromHeader(h http.Header) (*User, error) {
	name, err := userFromBasicAuth(h.Get("Authorization"))
	if err != nil {
		return nil, err
	}
	return s.resolveUser(name)
}

// tokenExempt lists the endpoints reachable without X-Access-Token
// (/files accepts a signature instead, checked by its handler).
func tokenExempt(r *http.Request) bool {
	switch r.URL.Path {
	case "/health", "/init", "/files":
		return true
	}
	return false
}

func (s *Server) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
		h.Set("Access-Control-Allow-Headers", "*")
		h.Set("Access-Control-Expose-Headers", "*")
		if r.Method == http.MethodOptions {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		if tok := s.currentToken(); tok != "" && !tokenExempt(r) && !tokenOK(r.Header.Get("X-Access-Token"), tok) {
			if strings.Count(r.URL.Path, "/") == 2 && r.Method == http.MethodPost && strings.Contains(r.URL.Path, ".") {
				// A Connect RPC path: answer with a Connect error body.
				writeConnectError(w, connect.CodeUnauthenticated, "invalid or missing access token")
				return
			}
			writeJSONError(w, errs.E(errs.Unauthenticated, "invalid or missing access token"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

func tokenOK(got, want string) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

func writeConnectError(w http.ResponseWriter, code connect.Code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	status := http.StatusUnauthorized
	if code != connect.CodeUnauthenticated {
		status = http.StatusBadRequest
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"code": code.String(), "message": msg})
}

// writeJSONError writes the REST error body {"code": <status>, "message"}.
func writeJSONError(w http.ResponseWriter, err error) {
	st := errs.HTTPStatus(errs.KindOf(err))
	if errs.Is(err, errs.ResourceExhausted) {
		st = http.StatusInsufficientStorage
	}
	writeJSON(w, st, map[string]any{"code": st, "message": errs.Message(err)})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// connectErr maps an errs error to a Connect error.
func connectErr(err error) error {
	if err == nil {
		return nil
	}
	var code connect.Code
	if code.UnmarshalText([]byte(errs.ConnectCode(errs.KindOf(err)))) != nil {
		code = connect.CodeInternal
	}
	return connect.NewError(code, errorString(errs.Message(err)))
}

type errorString string

func (e errorString) Error() string { return string(e) }

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleEnvs(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.envVars())
}

// hostname reports the sandbox host name (for logs and tests).
func hostname() string { h, _ := os.Hostname(); return h }

var startTime = time.Now()

// EnvVars returns a copy of the sandbox env vars (set by Options and /init).
func (s *Server) EnvVars() map[string]string { return s.envVars() }

// AccessToken returns the current access token ("" = none).
func (s *Server) AccessToken() string { return s.currentToken() }

// DefaultUser returns the account of requests that name none.
func (s *Server) DefaultUser() (*User, error) { return s.resolveUser("") }

// BaseEnv is PATH, HOME, USER and LOGNAME of u (what processes start with
// before the sandbox env vars).
func (s *Server) BaseEnv(u *User) []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	return []string{"PATH=" + path, "HOME=" + u.Home, "USER=" + u.Name, "LOGNAME=" + u.Name}
}
