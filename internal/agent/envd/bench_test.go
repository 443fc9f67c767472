//go:build linux

package envd

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/cubesandbox/cube/internal/agent/agenttest"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// latencies records per-iteration durations and reports p50/p99.
type latencies []time.Duration

func (l latencies) report(b *testing.B) { agenttest.ReportLatencies(b, l) }

func benchEnv(b *testing.B) (*Server, string) {
	s := New(Options{DefaultUser: "root"})
	srv := &http.Server{Handler: s.Handler()}
	l, err := netListen()
	if err != nil {
		b.Fatal(err)
	}
	go srv.Serve(l)
	b.Cleanup(func() { srv.Close(); s.Close() })
	return s, "http://" + l.Addr().String()
}

// BenchmarkCommandsRunTrue is the SDK's commands.run("true"): a Connect
// stream Start of `/bin/bash -l -c true` over loopback HTTP/1.1 (JSON
// codec, as the JS SDK sends it), to the end event. Peers below.
func BenchmarkCommandsRunTrue(b *testing.B) {
	_, base := benchEnv(b)
	c := processconnect.NewProcessClient(http.DefaultClient, base, connect.WithProtoJSON())
	var lat latencies
	for b.Loop() {
		t0 := time.Now()
		st, err := c.Start(context.Background(), bashReq("true"))
		if err != nil {
			b.Fatal(err)
		}
		for st.Receive() {
		}
		if st.Err() != nil {
			b.Fatal(st.Err())
		}
		lat = append(lat, time.Since(t0))
	}
	lat.report(b)
}

func benchExec(b *testing.B, name string, args ...string) {
	var lat latencies
	for b.Loop() {
		t0 := time.Now()
		if err := exec.Command(name, args...).Run(); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	lat.report(b)
}

// BenchmarkPeerBashTrue is the peer: fork+exec of `bash -c true` here.
func BenchmarkPeerBashTrue(b *testing.B) { benchExec(b, "/bin/bash", "-c", "true") }

// BenchmarkPeerBashLoginTrue: fork+exec of `bash -l -c true` (what the
// SDK asks envd to run).
func BenchmarkPeerBashLoginTrue(b *testing.B) { benchExec(b, "/bin/bash", "-l", "-c", "true") }

const benchFileSize = 100 << 20

func benchFile(b *testing.B) string {
	dir := b.TempDir()
	p := filepath.Join(dir, "src.bin")
	buf := make([]byte, benchFileSize)
	rand.Read(buf)
	if err := os.WriteFile(p, buf, 0o644); err != nil {
		b.Fatal(err)
	}
	return p
}

// BenchmarkUpload100MB streams a 100 MB file through POST /files
// (multipart, as the SDK sends it) over loopback.
func BenchmarkUpload100MB(b *testing.B) {
	_, base := benchEnv(b)
	src := benchFile(b)
	dst := filepath.Join(filepath.Dir(src), "dst.bin")
	b.SetBytes(benchFileSize)
	for b.Loop() {
		pr, pw := io.Pipe()
		mw := multipart.NewWriter(pw)
		go func() {
			f, _ := os.Open(src)
			defer f.Close()
			w, _ := mw.CreateFormFile("file", dst)
			io.Copy(w, f)
			mw.Close()
			pw.Close()
		}()
		res, err := plainClient.Post(base+"/files?path="+url.QueryEscape(dst), mw.FormDataContentType(), pr)
		if err != nil || res.StatusCode != 200 {
			b.Fatalf("upload: %v %v", res, err)
		}
		res.Body.Close()
	}
}

// BenchmarkDownload100MB reads a 100 MB file through GET /files.
func BenchmarkDownload100MB(b *testing.B) {
	_, base := benchEnv(b)
	src := benchFile(b)
	b.SetBytes(benchFileSize)
	for b.Loop() {
		res, err := plainClient.Get(base + "/files?path=" + url.QueryEscape(src))
		if err != nil || res.StatusCode != 200 {
			b.Fatalf("download: %v %v", res, err)
		}
		n, _ := io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if n != benchFileSize {
			b.Fatalf("short download %d", n)
		}
	}
}

// BenchmarkPeerCp100MB is the peer: `cp` of the same file.
func BenchmarkPeerCp100MB(b *testing.B) {
	src := benchFile(b)
	dst := filepath.Join(filepath.Dir(src), "cp.bin")
	b.SetBytes(benchFileSize)
	for b.Loop() {
		if out, err := exec.Command("cp", src, dst).CombinedOutput(); err != nil {
			b.Fatal(fmt.Errorf("%v: %s", err, out))
		}
	}
}

var _ = bytes.MinRead

// plainClient does not ask for gzip (Go's default does; the SDK does not).
// Large buffers: the client should not be the bottleneck.
var plainClient = &http.Client{Transport: &http.Transport{DisableCompression: true, WriteBufferSize: 1 << 20, ReadBufferSize: 1 << 20}}
