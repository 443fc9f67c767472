package api_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/config"
)

func TestProxyRouting(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.Domain = "cube.test" })
	sb := e.create(e.key, `{"templateID":"base"}`)
	id := sb.SandboxID
	// Header routing.
	r := e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "49999")
	if r.Status != 200 || string(r.Body) != id+":49999" {
		t.Fatalf("header routing: %d %s", r.Status, r.Body)
	}
	// envd /health through the proxy, same path as the API's /health.
	if r := e.do("GET", "/health", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "49983"); r.Status != 204 {
		t.Fatalf("envd health: %d", r.Status)
	}
	// Host routing.
	r = e.do("GET", "/who", "", nil, "Host", "8080-"+id+".cube.test:3000")
	if r.Status != 200 || string(r.Body) != id+":8080" {
		t.Fatalf("host routing: %d %s", r.Status, r.Body)
	}
	// Another domain is not ours: control plane.
	if r := e.do("GET", "/who", "", nil, "Host", "8080-"+id+".other.test"); r.Status != 404 {
		t.Fatalf("foreign host: %d", r.Status)
	}
	// Unknown sandbox: E2B's 502 body.
	r = e.do("GET", "/health", "", nil, "E2b-Sandbox-Id", "nosuchsandbox", "E2b-Sandbox-Port", "49983")
	var nf struct {
		SandboxID string `json:"sandboxId"`
		Message   string `json:"message"`
		Code      int    `json:"code"`
	}
	r.json(t, &nf)
	if r.Status != 502 || nf.Code != 502 || nf.SandboxID != "nosuchsandbox" || nf.Message == "" {
		t.Fatalf("unknown: %d %s", r.Status, r.Body)
	}
	if r := e.do("GET", "/health", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "http"); r.Status != 400 {
		t.Fatalf("bad port: %d", r.Status)
	}
	if r := e.do("GET", "/health", "", nil, "E2b-Sandbox-Id", "../x", "E2b-Sandbox-Port", "1"); r.Status != 502 {
		t.Fatalf("bad id: %d", r.Status)
	}
	// Nothing listening on the port: 502 (after the short grace).
	e.rt.Handler = func(sid string, port int) http.Handler {
		if port == 1234 {
			return nil
		}
		return newEnvdLike(sid, port)
	}
	if r := e.do("GET", "/", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "1234"); r.Status != 502 || !strings.Contains(string(r.Body), "1234") {
		t.Fatalf("closed port: %d %s", r.Status, r.Body)
	}
	// Paused (no autoResume): 502; killed: 502.
	e.do("POST", "/sandboxes/"+id+"/pause", e.key, `{}`)
	if r := e.do("GET", "/health", "", nil, "E2b-Sandbox-Id", id); r.Status != 502 {
		t.Fatalf("paused: %d", r.Status)
	}
	e.do("DELETE", "/sandboxes/"+id, e.key, nil)
	if r := e.do("GET", "/health", "", nil, "E2b-Sandbox-Id", id); r.Status != 502 {
		t.Fatalf("killed: %d", r.Status)
	}
}

func TestProxyAutoResumeAndTrafficToken(t *testing.T) {
	e := newEnv(t)
	sb := e.create(e.key, `{"templateID":"base","autoResume":{"enabled":true},"network":{"allowPublicTraffic":false}}`)
	if sb.TrafficAccessToken == nil || *sb.TrafficAccessToken == "" {
		t.Fatalf("no traffic token: %+v", sb)
	}
	id := sb.SandboxID
	e.do("POST", "/sandboxes/"+id+"/pause", e.key, `{}`)
	// envd port needs no traffic token; the request resumes the sandbox.
	if r := e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "49983"); r.Status != 200 {
		t.Fatalf("auto-resume: %d %s", r.Status, r.Body)
	}
	var d struct{ State string }
	e.do("GET", "/sandboxes/"+id, e.key, nil).json(t, &d)
	if d.State != "running" {
		t.Fatalf("state after auto-resume: %s", d.State)
	}
	if r := e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "49999"); r.Status != 403 {
		t.Fatalf("no token: %d", r.Status)
	}
	if r := e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "49999", "E2B-Traffic-Access-Token", "wrong"); r.Status != 403 {
		t.Fatalf("wrong token: %d", r.Status)
	}
	if r := e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", id, "E2b-Sandbox-Port", "49999", "E2B-Traffic-Access-Token", *sb.TrafficAccessToken); r.Status != 200 {
		t.Fatalf("token: %d", r.Status)
	}
}

// The proxy streams: the first line arrives long before the stream ends,
// a request body is relayed while it is being sent, and a client hanging
// up mid-stream leaves the server healthy with no leaked goroutines.
func TestProxyStreaming(t *testing.T) {
	e := newEnv(t)
	id := e.create(e.key, `{"templateID":"base"}`).SandboxID
	req, _ := http.NewRequest("GET", e.srv.URL+"/stream?n=50", nil)
	req.Header.Set("E2b-Sandbox-Id", id)
	start := time.Now()
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(res.Body)
	line, err := br.ReadString('\n')
	if err != nil || line != "line 0\n" {
		t.Fatalf("%q %v", line, err)
	}
	if d := time.Since(start); d > 500*time.Millisecond { // the whole stream takes 1 s
		t.Fatalf("first line after %v: buffered", d)
	}
	before := runtime.NumGoroutine()
	res.Body.Close() // hang up mid-stream

	// Bidirectional: write, read the echo, write again.
	pr, pw := io.Pipe()
	req, _ = http.NewRequest("POST", e.srv.URL+"/echo", pr)
	req.Header.Set("E2b-Sandbox-Id", id)
	done := make(chan *http.Response, 1)
	go func() {
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			close(done)
			return
		}
		done <- res
	}()
	pw.Write([]byte("ping\n"))
	res = <-done
	if res == nil {
		t.FailNow()
	}
	br = bufio.NewReader(res.Body)
	if l, _ := br.ReadString('\n'); l != "ping\n" {
		t.Fatalf("echo %q", l)
	}
	pw.Write([]byte("pong\n"))
	if l, _ := br.ReadString('\n'); l != "pong\n" {
		t.Fatalf("echo %q", l)
	}
	pw.Close()
	res.Body.Close()

	// Still serving, and goroutines settle back.
	if r := e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", id); r.Status != 200 {
		t.Fatal(r.Status)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+5 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+5 {
		t.Fatalf("goroutines %d -> %d", before, n)
	}
}

func TestProxyWebSocket(t *testing.T) {
	e := newEnv(t)
	id := e.create(e.key, `{"templateID":"base"}`).SandboxID
	c, err := net.Dial("tcp", strings.TrimPrefix(e.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nE2b-Sandbox-Id: %s\r\nE2b-Sandbox-Port: 8888\r\n\r\n", id)
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil || res.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", res, err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("hello over ws"))
	buf := make([]byte, 13)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "hello over ws" {
		t.Fatalf("%q %v", buf, err)
	}
}

func newEnvdLike(id string, port int) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"id": id, "port": port})
	})
	return mux
}

var _ = context.Background

// A connection the proxy made to a sandbox before it was paused is never
// reused after the resume (a checkpointed process never answers on it).
func TestProxyNoReuseAcrossPause(t *testing.T) {
	e := newEnv(t)
	id := e.create(e.key, `{"templateID":"base"}`).SandboxID
	for round := 0; round < 3; round++ {
		for i := 0; i < 2; i++ { // the second request reuses the pooled connection
			if r := e.do("POST", "/who", "", `{}`, "E2b-Sandbox-Id", id); r.Status != 200 {
				t.Fatalf("round %d: %d %s", round, r.Status, r.Body)
			}
		}
		if r := e.do("POST", "/sandboxes/"+id+"/pause", e.key, `{}`); r.Status != 204 {
			t.Fatal(r.Status)
		}
		if r := e.do("POST", "/v2/sandboxes/"+id+"/connect", e.key, `{}`); r.Status != 201 {
			t.Fatal(r.Status)
		}
	}
}
