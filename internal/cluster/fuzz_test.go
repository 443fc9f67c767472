package cluster_test

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"
)

// FuzzHeartbeat: whatever a token holder sends as a report, the control
// answers 200 or a 4xx, never panics, and a refused report registers no
// node.
func FuzzHeartbeat(f *testing.F) {
	for _, s := range []string{
		`{"id":"n1","address":"127.0.0.1:3001","runtime":"gvisor","capacity":4,"free":4}`,
		`{"id":"n1","address":"127.0.0.1:3001","capacity":4,"free":9}`,
		`{"id":"local","address":"127.0.0.1:3001","capacity":1,"free":1}`,
		`{"id":"../x","address":"h:1"}`,
		`{"id":"n2","address":"nohost","capacity":1}`,
		`{"id":"n3","address":"127.0.0.1:1","capacity":1,"free":1,"sandboxes":[null]}`,
		`{"id":"n3","address":"127.0.0.1:1","capacity":1,"free":1,"sandboxes":[{"ID":"s","NodeID":"other"}]}`,
		`{"id":"n4","address":"127.0.0.1:1","capacity":1,"free":0,"sandboxes":[{"ID":"s","NodeID":"n4","State":"running"}],"templates":[{"ID":"t","State":"ready"}]}`,
		`{"id":"n5","address":"127.0.0.1:1","templates":[{}]}`,
		`{"id":"n6","address":"127.0.0.1:1","events":[{"ID":"0001","SandboxID":"s","Kind":"transition","To":"running"}]}`,
		`{"id":"n6","address":"127.0.0.1:1","events":[null]}`,
		`{"id":"n6","address":"127.0.0.1:1","events":[{"ID":"","SandboxID":"s"}]}`,
		`[]`, `{`, ``, `{"id":1}`,
	} {
		f.Add([]byte(s))
	}
	c := startControl(f, f.TempDir(), "")
	defer c.stop()
	h := c.s.Handler()
	f.Fuzz(func(t *testing.T, body []byte) {
		before := len(c.s.Cluster.Nodes())
		req := httptest.NewRequest("POST", "/cluster/v1/heartbeat", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch {
		case w.Code == http.StatusOK:
		case w.Code >= 400 && w.Code < 500:
			if len(c.s.Cluster.Nodes()) != before {
				t.Fatalf("a refused report (%d %s) registered a node", w.Code, w.Body)
			}
		default:
			t.Fatalf("answer %d %s", w.Code, w.Body)
		}
	})
}
