//go:build linux

package envd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func envelope(flag byte, payload []byte) []byte {
	b := make([]byte, 5+len(payload))
	b[0] = flag
	binary.BigEndian.PutUint32(b[1:], uint32(len(payload)))
	copy(b[5:], payload)
	return b
}

// rawRPC posts body to an RPC path in-process and returns status, body.
func rawRPC(h http.Handler, path, ct string, body []byte) (int, string) {
	req := httptest.NewRequest("POST", path, bytes.NewReader(body))
	req.Header.Set("Content-Type", ct)
	req.Header.Set("Connect-Protocol-Version", "1")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	b, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(b)
}

func TestMalformedConnect(t *testing.T) {
	e := newTestEnv(t, Options{})
	h := e.srv.Handler()
	stream := "application/connect+json"
	cases := []struct {
		name, path, ct string
		body           []byte
		want           string // substring of the response
	}{
		{"truncated envelope", "/process.Process/Connect", stream, []byte{0, 0, 0}, `"code":`},
		{"length beyond body", "/process.Process/Connect", stream, envelope(0, []byte("{}"))[:6], `"code":`},
		{"compressed flag without encoding", "/process.Process/Connect", stream, envelope(1, []byte("{}")), `"code":"`},
		{"invalid JSON", "/process.Process/Connect", stream, envelope(0, []byte("{not json")), `"invalid_argument"`},
		{"wrong field type", "/filesystem.Filesystem/WatchDir", stream, envelope(0, []byte(`{"path":5}`)), `"invalid_argument"`},
		{"unary invalid JSON", "/filesystem.Filesystem/Stat", "application/json", []byte("{"), `"invalid_argument"`},
		{"unary unknown enum", "/process.Process/SendSignal", "application/json", []byte(`{"signal":"SIGNAL_NOPE"}`), `"invalid_argument"`},
		{"oversize stream message", "/process.Process/Connect", stream, envelope(0, bytes.Repeat([]byte(" "), MaxMessageBytes+10)), `"resource_exhausted"`},
		{"oversize unary", "/filesystem.Filesystem/Stat", "application/json", []byte(`{"path":"` + strings.Repeat("a", MaxMessageBytes+10) + `"}`), `"resource_exhausted"`},
	}
	for _, c := range cases {
		status, body := rawRPC(h, c.path, c.ct, c.body)
		if !strings.Contains(body, c.want) {
			t.Errorf("%s: status %d body %q, want %s", c.name, status, body, c.want)
		}
	}
	// Unknown RPCs and services → 404.
	for _, p := range []string{"/process.Process/Nope", "/nope.Service/Method"} {
		if status, _ := rawRPC(h, p, "application/json", []byte("{}")); status != 404 {
			t.Errorf("%s: %d", p, status)
		}
	}
	// The server still works.
	if r := run(t, e.proc, bashReq("echo alive")); r.stdout != "alive\n" {
		t.Fatal("server broken by bad input")
	}
}

// FuzzConnectEnvelope feeds arbitrary bodies to streaming and unary RPC
// handlers that have no side effects: the handler must answer (never
// panic or hang) and never report success for garbage.
func FuzzConnectEnvelope(f *testing.F) {
	f.Add(byte(0), []byte(`{"process":{"pid":1}}`), true)
	f.Add(byte(2), []byte(`{}`), true)
	f.Add(byte(0), []byte(`{"path":"/nonexistent-fuzz"}`), false)
	f.Add(byte(1), []byte{0x1f, 0x8b}, true)
	f.Add(byte(0), []byte{}, false)
	s := New(Options{DefaultUser: "root"})
	defer s.Close()
	h := s.Handler()
	f.Fuzz(func(t *testing.T, flag byte, payload []byte, stream bool) {
		if len(payload) > 1<<16 {
			return
		}
		var status int
		var body string
		if stream {
			// Process.Connect to a pid nobody started: must end in an error.
			status, body = rawRPC(h, "/process.Process/Connect", "application/connect+json", envelope(flag, payload))
			if status == 200 && !strings.Contains(body, `"error"`) {
				t.Fatalf("stream accepted garbage: %q", body)
			}
		} else {
			status, body = rawRPC(h, "/filesystem.Filesystem/Stat", "application/json", payload)
			if status == 200 && !strings.Contains(body, `"entry"`) {
				t.Fatalf("unary 200 without entry: %q", body)
			}
		}
		_ = body
		// Also the raw payload as the whole body (no envelope).
		rawRPC(h, "/process.Process/Connect", "application/connect+json", payload)
	})
}
