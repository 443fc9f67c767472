//go:build linux

package envd

import (
	"context"
	"encoding/base64"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/cubesandbox/cube/proto/filesystem"
	"github.com/cubesandbox/cube/proto/filesystem/filesystemconnect"
	pb "github.com/cubesandbox/cube/proto/process"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

type testEnv struct {
	srv  *Server
	ts   *httptest.Server
	proc processconnect.ProcessClient
	bin  processconnect.ProcessClient // binary codec
	fs   filesystemconnect.FilesystemClient
}

func newTestEnv(t *testing.T, o Options) *testEnv {
	t.Helper()
	if o.DefaultUser == "" {
		o.DefaultUser = currentUserName(t)
	}
	s := New(o)
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(func() { ts.Close(); s.Close() })
	return &testEnv{
		srv:  s,
		ts:   ts,
		proc: processconnect.NewProcessClient(ts.Client(), ts.URL, connect.WithProtoJSON()),
		bin:  processconnect.NewProcessClient(ts.Client(), ts.URL),
		fs:   filesystemconnect.NewFilesystemClient(ts.Client(), ts.URL, connect.WithProtoJSON()),
	}
}

func currentUserName(t *testing.T) string {
	if os.Geteuid() == 0 {
		return "root"
	}
	u, err := LookupUser(os.Getenv("USER"))
	if err != nil {
		t.Skip("cannot determine the current user")
	}
	return u.Name
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (uid switching); the non-root paths are covered by the other tests")
	}
}

func basic(user string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"))
}

func bashReq(script string) *connect.Request[pb.StartRequest] {
	f := false
	return connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", script}},
		Stdin:   &f,
	})
}

type result struct {
	pid       uint32
	stdout    string
	stderr    string
	pty       string
	end       *pb.ProcessEvent_EndEvent
	keepalive int
	events    []string
}

// collect reads a process stream to its end.
func collect(t *testing.T, st interface {
	Receive() bool
	Err() error
}, msg func() *pb.ProcessEvent) result {
	t.Helper()
	var r result
	for st.Receive() {
		ev := msg()
		switch e := ev.Event.(type) {
		case *pb.ProcessEvent_Start:
			r.pid = e.Start.Pid
			r.events = append(r.events, "start")
		case *pb.ProcessEvent_Data:
			r.events = append(r.events, "data")
			r.stdout += string(e.Data.GetStdout())
			r.stderr += string(e.Data.GetStderr())
			r.pty += string(e.Data.GetPty())
		case *pb.ProcessEvent_End:
			r.events = append(r.events, "end")
			r.end = e.End
		case *pb.ProcessEvent_Keepalive:
			r.keepalive++
			r.events = append(r.events, "keepalive")
		}
	}
	if err := st.Err(); err != nil {
		t.Fatalf("stream error: %v", err)
	}
	return r
}

func run(t *testing.T, c processconnect.ProcessClient, req *connect.Request[pb.StartRequest]) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	return collect(t, st, func() *pb.ProcessEvent { return st.Msg().Event })
}

func codeOf(err error) connect.Code { return connect.CodeOf(err) }

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func pidAlive(pid uint32) bool {
	b, err := os.ReadFile("/proc/" + itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && !strings.HasPrefix(strings.TrimSpace(s[i+1:]), "Z")
}

func itoa(n uint32) string { return strings.TrimSpace(strings.Repeat(" ", 0) + fmtUint(n)) }

func fmtUint(n uint32) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for n > 0 {
		b = append([]byte{byte('0' + n%10)}, b...)
		n /= 10
	}
	return string(b)
}

func statReq(p string) *connect.Request[fspb.StatRequest] {
	return connect.NewRequest(&fspb.StatRequest{Path: p})
}

var _ = http.StatusOK

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
