//go:build linux

package interp

import (
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/agent/agenttest"
)

// latencies records per-iteration durations and reports p50/p99.
type latencies []time.Duration

func (l latencies) report(b *testing.B) { agenttest.ReportLatencies(b, l) }

// BenchmarkRunCode1Plus1 is the SDK's runCode("1+1"): POST /execute on
// loopback to a warm ipykernel, reading the NDJSON stream to its end.
func BenchmarkRunCode1Plus1(b *testing.B) {
	if err := exec.Command(Python(), "-c", "import ipykernel").Run(); err != nil {
		b.Skip("python3-ipykernel not installed")
	}
	s := New(nil, testEnv{})
	srv := &http.Server{Handler: s.Handler()}
	ts := newLoopback(b, srv)
	defer s.Close()
	post := func() {
		res, err := http.Post(ts+"/execute", "application/json", strings.NewReader(`{"code":"1+1"}`))
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if !strings.Contains(string(body), `"text":"2"`) {
			b.Fatalf("unexpected: %s", body)
		}
	}
	post() // start the kernel
	var lat latencies
	for b.Loop() {
		t0 := time.Now()
		post()
		lat = append(lat, time.Since(t0))
	}
	lat.report(b)
}

// BenchmarkPeerPythonOneLiner is a peer: a fresh `python3 -c 1+1`.
func BenchmarkPeerPythonOneLiner(b *testing.B) {
	var lat latencies
	for b.Loop() {
		t0 := time.Now()
		if err := exec.Command(Python(), "-c", "1+1").Run(); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	lat.report(b)
}
