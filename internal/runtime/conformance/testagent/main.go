// Command testagent is a minimal stand-in for cube-agent used by the runtime
// conformance suite only while the real agent (cmd/cube-agent) is not built
// in this tree: GET /health (204) and the envd Connect server-streaming
// method POST /process.Process/Start with the JSON codec (stdout, stderr and
// the exit code; no stdin, pty or signals). It is never shipped in a template
// built by `cube tpl`.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
)

type processConfig struct {
	Cmd  string            `json:"cmd"`
	Args []string          `json:"args"`
	Envs map[string]string `json:"envs"`
	Cwd  *string           `json:"cwd"`
}

type startRequest struct {
	Process processConfig `json:"process"`
}

func frame(w http.ResponseWriter, flag byte, v any) {
	b, _ := json.Marshal(v)
	var hdr [5]byte
	hdr[0] = flag
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(b)))
	w.Write(hdr[:])
	w.Write(b)
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
}

// streamWriter turns process output into data events.
type streamWriter struct {
	mu   *sync.Mutex
	w    http.ResponseWriter
	name string
}

func (s streamWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	frame(s.w, 0, map[string]any{"event": map[string]any{"data": map[string]any{s.name: p}}})
	return len(p), nil
}

func start(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "method", http.StatusMethodNotAllowed)
		return
	}
	var hdr [5]byte
	if _, err := r.Body.Read(hdr[:]); err != nil {
		http.Error(w, "short body", http.StatusBadRequest)
		return
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	body := make([]byte, n)
	if _, err := readFull(r, body); err != nil {
		http.Error(w, "short body", http.StatusBadRequest)
		return
	}
	var req startRequest
	if err := json.Unmarshal(body, &req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/connect+json")
	w.WriteHeader(http.StatusOK)
	cmd := exec.Command(req.Process.Cmd, req.Process.Args...)
	cmd.Env = os.Environ()
	for k, v := range req.Process.Envs {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if req.Process.Cwd != nil {
		cmd.Dir = *req.Process.Cwd
	}
	var mu sync.Mutex
	cmd.Stdout = streamWriter{&mu, w, "stdout"}
	cmd.Stderr = streamWriter{&mu, w, "stderr"}
	if err := cmd.Start(); err != nil {
		frame(w, 2, map[string]any{"error": map[string]any{"code": "invalid_argument", "message": err.Error()}})
		return
	}
	mu.Lock()
	frame(w, 0, map[string]any{"event": map[string]any{"start": map[string]any{"pid": cmd.Process.Pid}}})
	mu.Unlock()
	err := cmd.Wait()
	end := map[string]any{"exited": true, "status": "exit status 0"}
	if err != nil {
		code := cmd.ProcessState.ExitCode()
		end = map[string]any{"exitCode": code, "exited": code >= 0, "status": err.Error(), "error": err.Error()}
	}
	mu.Lock()
	frame(w, 0, map[string]any{"event": map[string]any{"end": end}})
	frame(w, 2, map[string]any{})
	mu.Unlock()
}

func readFull(r *http.Request, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.Body.Read(b[n:])
		n += m
		if err != nil && n < len(b) {
			return n, err
		}
	}
	return n, nil
}

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/process.Process/Start", start)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotImplemented)
		fmt.Fprintf(w, `{"code":"unimplemented","message":%q}`, strings.TrimPrefix(r.URL.Path, "/"))
	})
	_ = bytes.MinRead
	log.Fatal(http.ListenAndServe(":49983", mux))
}
