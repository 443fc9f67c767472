//go:build linux

package interp

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

type testEnv struct{ token string }

func (e testEnv) EnvVars() map[string]string { return map[string]string{"SANDBOX_ENV": "from-sandbox"} }
func (e testEnv) AccessToken() string        { return e.token }
func (e testEnv) KernelUser() (RunAs, string, error) {
	home, _ := os.UserHomeDir()
	return RunAs{Env: []string{"PATH=" + os.Getenv("PATH"), "HOME=" + home}}, home, nil
}

func newServer(t *testing.T) *httptest.Server {
	s := New(nil, testEnv{})
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(func() { ts.Close(); s.Close() })
	return ts
}

func needPython(t *testing.T) {
	t.Helper()
	if err := exec.Command(Python(), "-c", "import ipykernel, matplotlib").Run(); err != nil {
		t.Skip("python3-ipykernel/python3-matplotlib not installed (make deps installs them); bash contexts are tested without them")
	}
}

type execution struct {
	status  int
	lines   []map[string]any
	stdout  string
	stderr  string
	results []map[string]any
	errors  []map[string]any
	count   int
	body    string
}

func execute(t *testing.T, ts *httptest.Server, req map[string]any) execution {
	t.Helper()
	b, _ := json.Marshal(req)
	res, err := http.Post(ts.URL+"/execute", "application/json", strings.NewReader(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	ex := execution{status: res.StatusCode}
	if res.StatusCode != 200 {
		body, _ := io.ReadAll(res.Body)
		ex.body = string(body)
		return ex
	}
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("bad NDJSON line %q", sc.Text())
		}
		ex.lines = append(ex.lines, m)
		switch m["type"] {
		case "stdout":
			ex.stdout += m["text"].(string)
		case "stderr":
			ex.stderr += m["text"].(string)
		case "result":
			ex.results = append(ex.results, m)
		case "error":
			ex.errors = append(ex.errors, m)
		case "number_of_executions":
			ex.count = int(m["execution_count"].(float64))
		}
	}
	if n := len(ex.lines); n == 0 || ex.lines[n-1]["type"] != "end_of_execution" {
		t.Fatalf("stream did not end with end_of_execution: %v", ex.lines)
	}
	return ex
}

func mainText(ex execution) string {
	for _, r := range ex.results {
		if r["is_main_result"] == true {
			s, _ := r["text"].(string)
			return s
		}
	}
	return ""
}

func TestPythonKernel(t *testing.T) {
	needPython(t)
	ts := newServer(t)
	ex := execute(t, ts, map[string]any{"code": "x = 41\nprint('hello')"})
	if ex.stdout != "hello\n" || ex.count < 1 {
		t.Fatalf("first: %+v", ex)
	}
	ex = execute(t, ts, map[string]any{"code": "x + 1"})
	if mainText(ex) != "42" {
		t.Fatalf("state across calls: %+v", ex.lines)
	}
	if ex = execute(t, ts, map[string]any{"code": "'abc'"}); mainText(ex) != "abc" {
		t.Fatalf("string result: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "import sys\nprint('e', file=sys.stderr)\n1/0"})
	if len(ex.errors) != 1 || ex.errors[0]["name"] != "ZeroDivisionError" || ex.errors[0]["value"] != "division by zero" ||
		!strings.Contains(ex.errors[0]["traceback"].(string), "ZeroDivisionError") || ex.stderr != "e\n" {
		t.Fatalf("error: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"})
	if len(ex.results) != 1 || ex.results[0]["is_main_result"] != false || len(ex.results[0]["png"].(string)) < 100 {
		t.Fatalf("matplotlib: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "import pandas as pd\npd.DataFrame({'a': [1, 2]})"})
	if len(ex.results) != 1 || !strings.Contains(ex.results[0]["html"].(string), "<table") {
		t.Fatalf("pandas html: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "import os\nprint(os.environ.get('PER_EXEC'), os.environ.get('SANDBOX_ENV'))", "env_vars": map[string]string{"PER_EXEC": "yes"}})
	if ex.stdout != "yes from-sandbox\n" {
		t.Fatalf("env vars: %q", ex.stdout)
	}
	if ex = execute(t, ts, map[string]any{"code": "print(os.environ.get('PER_EXEC'))"}); ex.stdout != "None\n" {
		t.Fatalf("per-execution env leaked: %q", ex.stdout)
	}
}

func createContext(t *testing.T, ts *httptest.Server, body string) map[string]any {
	t.Helper()
	res, err := http.Post(ts.URL+"/contexts", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var c map[string]any
	json.NewDecoder(res.Body).Decode(&c)
	if res.StatusCode != 200 || c["id"] == "" {
		t.Fatalf("create context %s: %d %v", body, res.StatusCode, c)
	}
	return c
}

func TestContexts(t *testing.T) {
	needPython(t)
	ts := newServer(t)
	dir := t.TempDir()
	a := createContext(t, ts, `{"language":"python","cwd":"`+dir+`"}`)
	b := createContext(t, ts, `{}`)
	if a["cwd"] != dir || a["language"] != "python" || b["language"] != "python" {
		t.Fatalf("contexts %v %v", a, b)
	}
	execute(t, ts, map[string]any{"code": "secret = 1", "context_id": a["id"]})
	ex := execute(t, ts, map[string]any{"code": "secret", "context_id": b["id"]})
	if len(ex.errors) != 1 || ex.errors[0]["name"] != "NameError" {
		t.Fatalf("contexts share state: %+v", ex.lines)
	}
	if ex := execute(t, ts, map[string]any{"code": "import os; os.getcwd()", "context_id": a["id"]}); mainText(ex) != dir {
		t.Fatalf("cwd: %+v", ex.lines)
	}
	res, _ := http.Get(ts.URL + "/contexts")
	var list []map[string]any
	json.NewDecoder(res.Body).Decode(&list)
	if len(list) != 2 {
		t.Fatalf("list: %v", list)
	}
	// Restart clears state.
	res, _ = http.Post(ts.URL+"/contexts/"+a["id"].(string)+"/restart", "application/json", nil)
	if res.StatusCode != 200 {
		t.Fatalf("restart: %d", res.StatusCode)
	}
	if ex := execute(t, ts, map[string]any{"code": "secret", "context_id": a["id"]}); len(ex.errors) != 1 {
		t.Fatalf("state survived restart: %+v", ex.lines)
	}
	req, _ := http.NewRequest("DELETE", ts.URL+"/contexts/"+a["id"].(string), nil)
	if res, _ = http.DefaultClient.Do(req); res.StatusCode != 200 {
		t.Fatalf("delete: %d", res.StatusCode)
	}
	if ex := execute(t, ts, map[string]any{"code": "1", "context_id": a["id"]}); ex.status != 404 {
		t.Fatalf("deleted context: %d", ex.status)
	}
	if res, _ = http.DefaultClient.Do(req); res.StatusCode != 404 {
		t.Fatalf("delete twice: %d", res.StatusCode)
	}
}

func TestInterruptOnDisconnect(t *testing.T) {
	needPython(t)
	ts := newServer(t)
	execute(t, ts, map[string]any{"code": "y = 7"})
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", ts.URL+"/execute", strings.NewReader(`{"code":"import time\ntime.sleep(60)"}`))
	res, err := http.DefaultClient.Do(req)
	if err == nil {
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	start := time.Now()
	ex := execute(t, ts, map[string]any{"code": "y * 6"})
	if mainText(ex) != "42" || time.Since(start) > 20*time.Second {
		t.Fatalf("kernel not interrupted / state lost: %+v after %v", ex.lines, time.Since(start))
	}
}

func TestBashContext(t *testing.T) {
	ts := newServer(t)
	ex := execute(t, ts, map[string]any{"code": "X=5; cd /tmp; echo out; echo err >&2", "language": "bash"})
	if ex.stdout != "out\n" || ex.stderr != "err\n" || len(ex.errors) != 0 {
		t.Fatalf("bash: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "echo $X $(pwd) $SANDBOX_ENV $PER; false", "language": "bash", "env_vars": map[string]string{"PER": "p"}})
	if ex.stdout != "5 /tmp from-sandbox p\n" || len(ex.errors) != 1 || ex.errors[0]["value"] != "1" {
		t.Fatalf("bash state: %+v", ex.lines)
	}
	if ex = execute(t, ts, map[string]any{"code": "echo \"[$PER]\"", "language": "bash"}); ex.stdout != "[]\n" {
		t.Fatalf("per-execution env leaked: %q", ex.stdout)
	}
	// Output without a trailing newline, and a marker-like string.
	if ex = execute(t, ts, map[string]any{"code": "printf 'no newline'; printf '\\036CUBE'", "language": "bash"}); ex.stdout != "no newline\x1eCUBE" {
		t.Fatalf("partial output: %q", ex.stdout)
	}
	// exit kills the shell: the error says so and the next call gets a fresh one.
	ex = execute(t, ts, map[string]any{"code": "exit 3", "language": "bash"})
	if len(ex.errors) != 1 || ex.errors[0]["name"] != "UnexpectedEndOfExecution" {
		t.Fatalf("exit: %+v", ex.lines)
	}
	if ex = execute(t, ts, map[string]any{"code": "echo again", "language": "bash"}); ex.stdout != "again\n" {
		t.Fatalf("after exit: %+v", ex.lines)
	}
}

func TestJavaScriptContext(t *testing.T) {
	if _, err := exec.LookPath("node"); err != nil {
		t.Skip("node not installed; javascript contexts exist only when the image has node")
	}
	ts := newServer(t)
	ex := execute(t, ts, map[string]any{"code": "var a = 20; console.log('x'); a + 1", "language": "js"})
	if ex.stdout != "x\n" || mainText(ex) != "21" {
		t.Fatalf("js: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "a * 2", "language": "javascript"})
	if mainText(ex) != "40" {
		t.Fatalf("js state: %+v", ex.lines)
	}
	ex = execute(t, ts, map[string]any{"code": "throw new TypeError('bad')", "language": "js"})
	if len(ex.errors) != 1 || ex.errors[0]["name"] != "TypeError" || ex.errors[0]["value"] != "bad" {
		t.Fatalf("js error: %+v", ex.lines)
	}
}

func TestBadRequests(t *testing.T) {
	ts := newServer(t)
	for body, want := range map[string]int{
		`{`:  400,
		`{}`: 400,
		`{"code":"1","context_id":"x","language":"python"}`: 400,
		`{"code":"1","context_id":"nope"}`:                  404,
		`{"code":"1","language":"cobol"}`:                   400,
	} {
		res, err := http.Post(ts.URL+"/execute", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode != want {
			t.Errorf("%s: %d want %d", body, res.StatusCode, want)
		}
	}
	for body, want := range map[string]int{`{"language":"cobol"}`: 400, `{"cwd":"/no/such/dir"}`: 400, `{`: 400} {
		res, _ := http.Post(ts.URL+"/contexts", "application/json", strings.NewReader(body))
		if res.StatusCode != want {
			t.Errorf("create %s: %d", body, res.StatusCode)
		}
	}
	res, _ := http.Post(ts.URL+"/contexts/nope/restart", "application/json", nil)
	if res.StatusCode != 404 {
		t.Errorf("restart unknown: %d", res.StatusCode)
	}
	res, _ = http.Get(ts.URL + "/health")
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != 200 || strings.TrimSpace(string(b)) != `"OK"` {
		t.Errorf("health: %d %s", res.StatusCode, b)
	}
}

func TestExecuteNeedsToken(t *testing.T) {
	s := New(nil, testEnv{token: "tk"})
	ts := httptest.NewServer(s.Handler())
	defer func() { ts.Close(); s.Close() }()
	res, _ := http.Post(ts.URL+"/execute", "application/json", strings.NewReader(`{"code":"echo","language":"bash"}`))
	if res.StatusCode != 401 {
		t.Fatalf("no token: %d", res.StatusCode)
	}
}

func newLoopback(tb testing.TB, srv *http.Server) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	return "http://" + l.Addr().String()
}
