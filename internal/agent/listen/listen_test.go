//go:build linux

package listen

import (
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/mdlayher/vsock"
)

func serveHello(t *testing.T, ls []net.Listener) {
	hs := NewHTTPServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") }))
	for _, l := range ls {
		go hs.Serve(l)
	}
	t.Cleanup(func() { hs.Close() })
}

func get(t *testing.T, c *http.Client) string {
	res, err := c.Get("http://agent/")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

func TestTCPAndUnix(t *testing.T) {
	ls, err := All("127.0.0.1:0", 0, false)
	if err != nil || len(ls) != 1 {
		t.Fatal(ls, err)
	}
	sock := filepath.Join(t.TempDir(), "s")
	us, err := All("unix:"+sock, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	serveHello(t, append(ls, us...))
	addr := ls[0].Addr().String()
	if got := get(t, &http.Client{Transport: &http.Transport{Dial: func(_, _ string) (net.Conn, error) { return net.Dial("tcp", addr) }}}); got != "hello" {
		t.Fatal(got)
	}
	if got := get(t, &http.Client{Transport: &http.Transport{Dial: func(_, _ string) (net.Conn, error) { return net.Dial("unix", sock) }}}); got != "hello" {
		t.Fatal(got)
	}
	if _, err := All("", 0, false); err == nil {
		t.Fatal("no listener accepted")
	}
}

// TestVsock listens on vsock like the agent in a microVM and dials it over
// the local (loopback) vsock transport.
func TestVsock(t *testing.T) {
	if _, err := os.Stat("/dev/vsock"); err != nil {
		t.Skip("no /dev/vsock here; TCP and Unix listeners are tested by TestTCPAndUnix")
	}
	const port = 52983
	ls, err := All("127.0.0.1:0", port, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != 2 {
		t.Skip("vsock listen unavailable on this kernel (no transport loaded)")
	}
	serveHello(t, ls)
	c := &http.Client{Transport: &http.Transport{Dial: func(_, _ string) (net.Conn, error) { return vsock.Dial(vsock.Local, port, nil) }}}
	res, err := c.Get("http://agent/")
	if err != nil {
		t.Skipf("vsock loopback dial unsupported here (%v); listening worked", err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if string(b) != "hello" {
		t.Fatal(string(b))
	}
}
