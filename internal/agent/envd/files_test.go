//go:build linux

package envd

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// multipartBody builds an E2B-style upload: parts named "file" whose
// filename is the full destination path.
func multipartBody(t *testing.T, files map[string][]byte) (io.Reader, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for name, data := range files {
		h := textproto.MIMEHeader{}
		h.Set("Content-Disposition", fmt.Sprintf(`form-data; name="file"; filename=%q`, name))
		h.Set("Content-Type", "application/octet-stream")
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
	}
	mw.Close()
	return &buf, mw.FormDataContentType()
}

func upload(t *testing.T, base, query string, files map[string][]byte, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	body, ct := multipartBody(t, files)
	req, _ := http.NewRequest("POST", base+"/files"+query, body)
	req.Header.Set("Content-Type", ct)
	return doFiles(t, req, hdr)
}

func download(t *testing.T, base, query string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/files"+query, nil)
	return doFiles(t, req, hdr)
}

// doFiles sends req with the extra headers hdr and reads the whole reply.
func doFiles(t *testing.T, req *http.Request, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res, b
}

func jsonCode(t *testing.T, b []byte) int {
	var e struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(b, &e); err != nil || e.Message == "" {
		t.Fatalf("not a JSON error body: %q", b)
	}
	return e.Code
}

func TestFilesUploadDownload(t *testing.T) {
	e := newTestEnv(t, Options{})
	dir := t.TempDir()
	bin := make([]byte, 300<<10)
	rand.Read(bin)
	// Multi-file upload, destinations from the raw part filenames.
	res, b := upload(t, e.ts.URL, "", map[string][]byte{dir + "/x/one.txt": []byte("one"), dir + "/y/z/two.bin": bin}, nil)
	if res.StatusCode != 200 {
		t.Fatalf("upload: %d %s", res.StatusCode, b)
	}
	var out []uploadResult
	json.Unmarshal(b, &out)
	if len(out) != 2 || out[0].Type != "file" {
		t.Fatalf("upload result %s", b)
	}
	res, b = download(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/y/z/two.bin"), nil)
	if res.StatusCode != 200 || !bytes.Equal(b, bin) {
		t.Fatalf("download binary: %d len %d", res.StatusCode, len(b))
	}
	if cd := res.Header.Get("Content-Disposition"); cd != `inline; filename=two.bin` {
		t.Fatalf("content-disposition %q", cd)
	}
	// path query param overrides the filename; overwrite.
	res, b = upload(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/x/one.txt"), map[string][]byte{"ignored": []byte("uno")}, nil)
	if res.StatusCode != 200 {
		t.Fatalf("upload with path: %d %s", res.StatusCode, b)
	}
	if _, b = download(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/x/one.txt"), nil); string(b) != "uno" {
		t.Fatalf("overwrite: %q", b)
	}
	// Range request.
	res, b = download(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/y/z/two.bin"), map[string]string{"Range": "bytes=10-19"})
	if res.StatusCode != 206 || !bytes.Equal(b, bin[10:20]) {
		t.Fatalf("range: %d", res.StatusCode)
	}
	// Empty file.
	upload(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/empty"), map[string][]byte{"e": nil}, nil)
	if res, b = download(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/empty"), nil); res.StatusCode != 200 || len(b) != 0 || res.ContentLength != 0 {
		t.Fatalf("empty: %d %d", res.StatusCode, len(b))
	}
	// gzip download on request (Go's client would decompress transparently:
	// ask explicitly and decode by hand).
	greq, _ := http.NewRequest("GET", e.ts.URL+"/files?path="+url.QueryEscape(dir+"/y/z/two.bin"), nil)
	greq.Header.Set("Accept-Encoding", "gzip")
	gres, err := http.DefaultClient.Do(greq)
	if err != nil || gres.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("gzip download: %v %v", gres, err)
	}
	zr, err := gzip.NewReader(gres.Body)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := io.ReadAll(zr); !bytes.Equal(got, bin) {
		t.Fatal("gzip download corrupted")
	}
	gres.Body.Close()
	// Raw octet-stream body with gzip.
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("zipped"))
	zw.Close()
	req, _ := http.NewRequest("POST", e.ts.URL+"/files?path="+url.QueryEscape(dir+"/raw.txt"), &gz)
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Content-Encoding", "gzip")
	if r, err := http.DefaultClient.Do(req); err != nil || r.StatusCode != 200 {
		t.Fatalf("octet-stream upload: %v %v", r, err)
	}
	if b, _ := os.ReadFile(dir + "/raw.txt"); string(b) != "zipped" {
		t.Fatalf("raw upload wrote %q", b)
	}
}

func TestFilesErrors(t *testing.T) {
	e := newTestEnv(t, Options{})
	dir := t.TempDir()
	os.Mkdir(dir+"/d", 0o755)
	cases := []struct {
		name  string
		query string
		want  int
	}{
		{"missing", "?path=" + url.QueryEscape(dir+"/nope"), 404},
		{"directory", "?path=" + url.QueryEscape(dir+"/d"), 400},
		{"no path", "", 400},
		{"NUL", "?path=%00x", 400},
		{"bad user", "?path=/etc/hostname&username=no-such-user-xyz", 401},
	}
	for _, c := range cases {
		res, b := download(t, e.ts.URL, c.query, nil)
		if res.StatusCode != c.want || jsonCode(t, b) != c.want {
			t.Errorf("GET %s: %d %s", c.name, res.StatusCode, b)
		}
	}
	// Upload onto a directory.
	if res, b := upload(t, e.ts.URL, "", map[string][]byte{dir + "/d": []byte("x")}, nil); res.StatusCode != 400 || jsonCode(t, b) != 400 {
		t.Fatalf("upload onto dir: %d %s", res.StatusCode, b)
	}
	// Not multipart; broken multipart; no file part.
	req, _ := http.NewRequest("POST", e.ts.URL+"/files?path=/tmp/x", strings.NewReader("x"))
	req.Header.Set("Content-Type", "text/plain")
	if r, _ := http.DefaultClient.Do(req); r.StatusCode != 400 {
		t.Fatalf("text/plain upload: %d", r.StatusCode)
	}
	req, _ = http.NewRequest("POST", e.ts.URL+"/files?path="+url.QueryEscape(dir+"/broken"), strings.NewReader("--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nabc"))
	req.Header.Set("Content-Type", "multipart/form-data; boundary=b")
	if r, _ := http.DefaultClient.Do(req); r.StatusCode != 400 {
		t.Fatalf("truncated multipart: %d", r.StatusCode)
	}
	body, ct := multipartBody(t, nil)
	req, _ = http.NewRequest("POST", e.ts.URL+"/files", body)
	req.Header.Set("Content-Type", ct)
	if r, _ := http.DefaultClient.Do(req); r.StatusCode != 400 {
		t.Fatalf("no parts: %d", r.StatusCode)
	}
}

func TestFilesPermissionsAndSymlinks(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Options{DefaultUser: "root"})
	secretDir := t.TempDir()
	secret := filepath.Join(secretDir, "secret")
	os.WriteFile(secret, []byte("TOPSECRET"), 0o600)
	pub := worldDir(t)
	os.Symlink(secret, filepath.Join(pub, "link"))
	os.Symlink("../../../../../../"+strings.TrimPrefix(secret, "/"), filepath.Join(pub, "rel"))

	for _, q := range []string{
		"?username=nobody&path=" + url.QueryEscape(secret),
		"?username=nobody&path=" + url.QueryEscape(pub+"/link"),
		"?username=nobody&path=" + url.QueryEscape(pub+"/rel"),
		"?username=nobody&path=" + url.QueryEscape(pub+"/../../../../"+strings.TrimPrefix(secret, "/")),
	} {
		res, b := download(t, e.ts.URL, q, nil)
		if res.StatusCode != 403 || bytes.Contains(b, []byte("TOPSECRET")) {
			t.Fatalf("GET %s as nobody: %d %q", q, res.StatusCode, b)
		}
	}
	// Root may read it.
	if _, b := download(t, e.ts.URL, "?path="+url.QueryEscape(pub+"/link"), nil); string(b) != "TOPSECRET" {
		t.Fatalf("root via symlink: %q", b)
	}
	// nobody cannot write into a root-only directory, nor through a symlink to a root file.
	res, b := upload(t, e.ts.URL, "?username=nobody&path="+url.QueryEscape(secretDir+"/new"), map[string][]byte{"x": []byte("x")}, nil)
	if res.StatusCode != 403 || jsonCode(t, b) != 403 {
		t.Fatalf("upload to 0700 dir as nobody: %d %s", res.StatusCode, b)
	}
	if _, err := os.Stat(secretDir + "/new"); err == nil {
		t.Fatal("file created despite 403")
	}
	res, _ = upload(t, e.ts.URL, "?username=nobody&path="+url.QueryEscape(pub+"/link"), map[string][]byte{"x": []byte("pwned")}, nil)
	if b, _ := os.ReadFile(secret); res.StatusCode != 403 || string(b) != "TOPSECRET" {
		t.Fatalf("write through symlink as nobody: %d, secret now %q", res.StatusCode, b)
	}
	// Files nobody creates (and their new parents) belong to nobody.
	res, b = upload(t, e.ts.URL, "?username=nobody&path="+url.QueryEscape(pub+"/n/m/f.txt"), map[string][]byte{"x": []byte("mine")}, nil)
	if res.StatusCode != 200 {
		t.Fatalf("upload as nobody: %d %s", res.StatusCode, b)
	}
	nb, _ := LookupUser("nobody")
	for _, p := range []string{pub + "/n", pub + "/n/m", pub + "/n/m/f.txt"} {
		var st = mustStat(t, p)
		if st != nb.UID {
			t.Fatalf("%s owned by %d, want %d", p, st, nb.UID)
		}
	}
}

func mustStat(t *testing.T, p string) uint32 {
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Uid
}

func TestAccessTokenAndSignature(t *testing.T) {
	e := newTestEnv(t, Options{AccessToken: "tok123"})
	dir := t.TempDir()
	os.WriteFile(dir+"/f", []byte("data"), 0o644)
	// Health needs nothing.
	if r, _ := http.Get(e.ts.URL + "/health"); r.StatusCode != 204 {
		t.Fatalf("health: %d", r.StatusCode)
	}
	// RPC without token → unauthenticated; with → ok.
	req, _ := http.NewRequest("POST", e.ts.URL+"/process.Process/List", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	r, _ := http.DefaultClient.Do(req)
	b, _ := io.ReadAll(r.Body)
	if r.StatusCode != 401 || !strings.Contains(string(b), `"unauthenticated"`) {
		t.Fatalf("rpc without token: %d %s", r.StatusCode, b)
	}
	req, _ = http.NewRequest("POST", e.ts.URL+"/process.Process/List", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Access-Token", "tok123")
	if r, _ := http.DefaultClient.Do(req); r.StatusCode != 200 {
		t.Fatalf("rpc with token: %d", r.StatusCode)
	}
	// /files: token, signature, neither.
	q := "?path=" + url.QueryEscape(dir+"/f")
	if r, _ := download(t, e.ts.URL, q, nil); r.StatusCode != 401 {
		t.Fatalf("files without token: %d", r.StatusCode)
	}
	if _, b := download(t, e.ts.URL, q, map[string]string{"X-Access-Token": "tok123"}); string(b) != "data" {
		t.Fatalf("files with token: %q", b)
	}
	sum := sha256.Sum256([]byte(dir + "/f:read::tok123"))
	sig := "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
	if _, b := download(t, e.ts.URL, q+"&signature="+url.QueryEscape(sig), nil); string(b) != "data" {
		t.Fatalf("files with signature: %q", b)
	}
	if r, _ := download(t, e.ts.URL, q+"&signature=v1_bogus", nil); r.StatusCode != 401 {
		t.Fatalf("bad signature: %d", r.StatusCode)
	}
	// /envs needs the token.
	if r, _ := http.Get(e.ts.URL + "/envs"); r.StatusCode != 401 {
		t.Fatalf("envs without token: %d", r.StatusCode)
	}
}

func TestInit(t *testing.T) {
	e := newTestEnv(t, Options{})
	post := func(body string, hdr map[string]string) int {
		req, _ := http.NewRequest("POST", e.ts.URL+"/init", strings.NewReader(body))
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return r.StatusCode
	}
	ent := make([]byte, 64)
	rand.Read(ent)
	body := fmt.Sprintf(`{"envVars":{"FOO":"bar"},"accessToken":"t1","timestamp":"2020-01-01T00:00:00Z","entropy":%q}`, base64.StdEncoding.EncodeToString(ent))
	if c := post(body, nil); c != 204 {
		t.Fatalf("init: %d", c)
	}
	// ManageClock is off: the host clock must not have moved.
	if c := post(`{}`, nil); c != 401 {
		t.Fatalf("re-init without token: %d", c)
	}
	if c := post(`{"accessToken":"t2"}`, map[string]string{"X-Access-Token": "t1"}); c != 204 {
		t.Fatalf("re-init with token: %d", c)
	}
	for _, bad := range []string{`{`, `{"timestamp":"yesterday"}`, `{"entropy":"!!"}`, `{"defaultUser":"no-such-user-xyz"}`} {
		if c := post(bad, map[string]string{"X-Access-Token": "t2"}); c != 400 {
			t.Fatalf("bad init %s: %d", bad, c)
		}
	}
	req, _ := http.NewRequest("GET", e.ts.URL+"/envs", nil)
	req.Header.Set("X-Access-Token", "t2")
	r, _ := http.DefaultClient.Do(req)
	var envs map[string]string
	json.NewDecoder(r.Body).Decode(&envs)
	if envs["FOO"] != "bar" {
		t.Fatalf("envs: %v", envs)
	}
	req, _ = http.NewRequest("GET", e.ts.URL+"/metrics", nil)
	req.Header.Set("X-Access-Token", "t2")
	r, _ = http.DefaultClient.Do(req)
	var m map[string]any
	json.NewDecoder(r.Body).Decode(&m)
	if m["mem_total"] == nil || m["cpu_count"] == nil || m["disk_total"] == nil {
		t.Fatalf("metrics: %v", m)
	}
}

func TestFileMetadata(t *testing.T) {
	e := newTestEnv(t, Options{})
	dir, err := os.MkdirTemp("/var/tmp", "envd-meta-") // /tmp may be tmpfs without user xattrs
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	res, b := upload(t, e.ts.URL, "?path="+url.QueryEscape(dir+"/m.txt"), map[string][]byte{"x": []byte("x")}, map[string]string{"X-Metadata-Owner": "alice", "x-metadata-stage": "dev"})
	if res.StatusCode != 200 {
		t.Fatalf("%d %s", res.StatusCode, b)
	}
	var out []uploadResult
	json.Unmarshal(b, &out)
	if out[0].Metadata == nil {
		t.Skip("filesystem without user xattrs: metadata not stored")
	}
	if out[0].Metadata["owner"] != "alice" || out[0].Metadata["stage"] != "dev" {
		t.Fatalf("upload metadata %v", out[0].Metadata)
	}
	st, err := e.fs.Stat(context.Background(), statReq(dir+"/m.txt"))
	if err != nil || st.Msg.Entry.Metadata["owner"] != "alice" {
		t.Fatalf("stat metadata: %v %v", st, err)
	}
}
