//go:build linux

// Package interp is cube-agent's code interpreter (port 49999), the
// stand-in for E2B's code-interpreter server: POST /execute streams NDJSON
// (stdout, stderr, rich results, errors, execution counts) from a
// persistent context; /contexts creates, lists, restarts and deletes
// contexts. Python runs in a real Jupyter kernel (ipykernel) spoken to
// over ZeroMQ; bash and (when node exists) JavaScript run in persistent
// interpreter processes.
package interp

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// KeepaliveInterval is how often /execute sends a keepalive line while
// the kernel is silent.
const KeepaliveInterval = 5 * time.Second

// Env supplies what kernels need from envd: the sandbox env vars, the
// account to run as, and the access token /execute must present.
type Env interface {
	EnvVars() map[string]string
	KernelUser() (RunAs, string, error) // identity, home directory
	AccessToken() string
}

// Context is an execution context.
type Context struct {
	ID       string `json:"id"`
	Language string `json:"language"`
	Cwd      string `json:"cwd"`

	isDefault bool
	mu        sync.Mutex // guards kernel
	kernel    Kernel
}

// Server is the code interpreter HTTP API.
type Server struct {
	log *slog.Logger
	env Env

	mu       sync.Mutex
	contexts map[string]*Context
	defaults map[string]*Context // language -> default context
	closed   bool
}

// New builds a Server; call Warm to start the default Python kernel early.
func New(log *slog.Logger, env Env) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{log: log, env: env, contexts: map[string]*Context{}, defaults: map[string]*Context{}}
}

// Warm starts the default Python context's kernel in the background.
func (s *Server) Warm() {
	go func() {
		c, err := s.defaultContext("python")
		if err != nil {
			return
		}
		if _, err := s.kernelOf(c); err != nil {
			s.log.Warn("python kernel unavailable", "err", err)
		}
	}()
}

// Close stops every kernel.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	all := make([]*Context, 0, len(s.contexts))
	for _, c := range s.contexts {
		all = append(all, c)
	}
	s.mu.Unlock()
	for _, c := range all {
		c.mu.Lock()
		if c.kernel != nil {
			c.kernel.Close()
			c.kernel = nil
		}
		c.mu.Unlock()
	}
}

// normLanguage lower-cases and maps aliases (js -> javascript; ts runs
// on the JavaScript kernel).
func normLanguage(l string) string {
	l = strings.ToLower(strings.TrimSpace(l))
	switch l {
	case "", "python3", "py":
		return "python"
	case "js", "ts", "typescript", "node":
		return "javascript"
	case "sh", "shell":
		return "bash"
	}
	return l
}

func supported(lang string) bool {
	return lang == "python" || lang == "bash" || lang == "javascript"
}

func (s *Server) defaultCwd(home string) string {
	for _, d := range []string{"/home/user", home} {
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return d
		}
	}
	return "/"
}

func (s *Server) defaultContext(lang string) (*Context, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errs.E(errs.Unavailable, "shutting down")
	}
	if c := s.defaults[lang]; c != nil {
		return c, nil
	}
	_, home, err := s.env.KernelUser()
	if err != nil {
		return nil, err
	}
	c := &Context{ID: newID(), Language: lang, Cwd: s.defaultCwd(home), isDefault: true}
	s.defaults[lang] = c
	s.contexts[c.ID] = c
	return c, nil
}

// kernelOf returns the context's kernel, starting it if needed (first use,
// after a restart, or after it died).
func (s *Server) kernelOf(c *Context) (Kernel, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.kernel != nil && !kernelDead(c.kernel) {
		return c.kernel, nil
	}
	if c.kernel != nil {
		c.kernel.Close()
		c.kernel = nil
	}
	as, _, err := s.env.KernelUser()
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, kv := range as.Env {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	for k, v := range s.env.EnvVars() {
		env[k] = v
	}
	as.Env = as.Env[:0:0]
	for k, v := range env {
		as.Env = append(as.Env, k+"="+v)
	}
	sort.Strings(as.Env)
	var k Kernel
	switch c.Language {
	case "python":
		k, err = startPython(c.Cwd, as)
	default:
		k, err = startREPL(c.Language, c.Cwd, as)
	}
	if err != nil {
		return nil, err
	}
	c.kernel = k
	return k, nil
}

func kernelDead(k Kernel) bool {
	var dead chan struct{}
	switch k := k.(type) {
	case *pyKernel:
		dead = k.dead
	case *replKernel:
		dead = k.dead
	}
	select {
	case <-dead:
		return true
	default:
		return false
	}
}

// Handler is the HTTP handler of the code interpreter.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, 200, "OK") })
	mux.HandleFunc("POST /execute", s.handleExecute)
	mux.HandleFunc("POST /contexts", s.handleCreate)
	mux.HandleFunc("GET /contexts", s.handleList)
	mux.HandleFunc("POST /contexts/{id}/restart", s.handleRestart)
	mux.HandleFunc("DELETE /contexts/{id}", s.handleDelete)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
		h.Set("Access-Control-Allow-Headers", "*")
		if r.Method == http.MethodOptions {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeText(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg)
}

func writeErr(w http.ResponseWriter, err error) {
	writeText(w, errs.HTTPStatus(errs.KindOf(err)), errs.Message(err))
}

type executeRequest struct {
	Code      *string           `json:"code"`
	ContextID string            `json:"context_id"`
	Language  string            `json:"language"`
	EnvVars   map[string]string `json:"env_vars"`
}

const maxExecuteBody = 16 << 20

func (s *Server) handleExecute(w http.ResponseWriter, r *http.Request) {
	if tok := s.env.AccessToken(); tok != "" && r.Header.Get("X-Access-Token") != tok {
		writeText(w, http.StatusUnauthorized, "invalid or missing access token")
		return
	}
	var req executeRequest
	body, err := io.ReadAll(io.LimitReader(r.Body, maxExecuteBody+1))
	if err != nil || len(body) > maxExecuteBody {
		writeText(w, http.StatusRequestEntityTooLarge, "request body too large")
		return
	}
	if err := json.Unmarshal(body, &req); err != nil || req.Code == nil {
		writeText(w, http.StatusBadRequest, "body must be JSON with a string field code")
		return
	}
	if req.ContextID != "" && req.Language != "" {
		writeText(w, http.StatusBadRequest, "only one of context_id and language may be given")
		return
	}
	var c *Context
	if req.ContextID != "" {
		s.mu.Lock()
		c = s.contexts[req.ContextID]
		s.mu.Unlock()
		if c == nil {
			writeText(w, http.StatusNotFound, "context "+req.ContextID+" not found")
			return
		}
	} else {
		lang := normLanguage(req.Language)
		if !supported(lang) {
			writeText(w, http.StatusBadRequest, "unsupported language "+req.Language)
			return
		}
		if c, err = s.defaultContext(lang); err != nil {
			writeErr(w, err)
			return
		}
	}
	k, err := s.kernelOf(c)
	if err != nil {
		writeErr(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	var wmu sync.Mutex
	enc := json.NewEncoder(w)
	write := func(ev Event) {
		wmu.Lock()
		defer wmu.Unlock()
		_ = enc.Encode(ev)
		_ = rc.Flush()
	}
	stopKA := make(chan struct{})
	go func() {
		t := time.NewTicker(KeepaliveInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				write(Event{"type": "keepalive"})
			case <-stopKA:
				return
			}
		}
	}()
	err = k.Execute(r.Context(), *req.Code, req.EnvVars, write)
	close(stopKA)
	if err != nil {
		if errs.Is(err, errs.Canceled) {
			return // the client is gone
		}
		write(Event{"type": "error", "name": "UnexpectedEndOfExecution", "value": errs.Message(err), "traceback": ""})
	}
	write(Event{"type": "end_of_execution"})
}

type createRequest struct {
	Language string `json:"language"`
	Cwd      string `json:"cwd"`
}

func (s *Server) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req createRequest
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if len(strings.TrimSpace(string(body))) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			writeText(w, http.StatusBadRequest, "malformed JSON body")
			return
		}
	}
	lang := normLanguage(req.Language)
	if !supported(lang) {
		writeText(w, http.StatusBadRequest, "unsupported language "+req.Language)
		return
	}
	cwd := req.Cwd
	if cwd == "" {
		_, home, err := s.env.KernelUser()
		if err != nil {
			writeErr(w, err)
			return
		}
		cwd = s.defaultCwd(home)
	}
	if st, err := os.Stat(cwd); err != nil || !st.IsDir() {
		writeText(w, http.StatusBadRequest, "cwd "+cwd+" is not a directory")
		return
	}
	c := &Context{ID: newID(), Language: lang, Cwd: cwd}
	if _, err := s.kernelOf(c); err != nil {
		writeErr(w, err)
		return
	}
	s.mu.Lock()
	s.contexts[c.ID] = c
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, c)
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	out := []*Context{}
	for _, c := range s.contexts {
		if !c.isDefault {
			out = append(out, c)
		}
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) lookup(w http.ResponseWriter, r *http.Request) *Context {
	id := r.PathValue("id")
	s.mu.Lock()
	c := s.contexts[id]
	s.mu.Unlock()
	if c == nil {
		writeText(w, http.StatusNotFound, "context "+id+" not found")
	}
	return c
}

func (s *Server) handleRestart(w http.ResponseWriter, r *http.Request) {
	c := s.lookup(w, r)
	if c == nil {
		return
	}
	c.mu.Lock()
	if c.kernel != nil {
		c.kernel.Close()
		c.kernel = nil
	}
	c.mu.Unlock()
	if _, err := s.kernelOf(c); err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, nil)
}

func (s *Server) handleDelete(w http.ResponseWriter, r *http.Request) {
	c := s.lookup(w, r)
	if c == nil {
		return
	}
	s.mu.Lock()
	delete(s.contexts, c.ID)
	for l, d := range s.defaults {
		if d == c {
			delete(s.defaults, l)
		}
	}
	s.mu.Unlock()
	c.mu.Lock()
	if c.kernel != nil {
		c.kernel.Close()
		c.kernel = nil
	}
	c.mu.Unlock()
	writeJSON(w, http.StatusOK, nil)
}

var _ = context.Background
