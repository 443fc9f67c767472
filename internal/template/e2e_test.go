//go:build linux

package template

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
	"github.com/cubesandbox/cube/internal/runtime/gvisor"
)

func cacheDir() string {
	if d := os.Getenv("CUBE_CACHE_DIR"); d != "" {
		return d
	}
	return "/var/cache/cube"
}

// newBuilder returns a Builder on a fresh gVisor runtime, or skips.
func newBuilder(t testing.TB) (*Builder, *gvisor.Runtime) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (runsc, netns, cgroups)")
	}
	runsc := os.Getenv("CUBE_RUNSC")
	if runsc == "" {
		runsc = filepath.Join(cacheDir(), "bin", "runsc")
	}
	if _, err := os.Stat(runsc); err != nil {
		t.Skip("runsc not built: make runsc")
	}
	data := t.TempDir()
	rt, err := gvisor.New(context.Background(), gvisor.Options{DataDir: data, RunscPath: runsc})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	cat, err := NewFileCatalog(filepath.Join(data, "catalog"))
	if err != nil {
		t.Fatal(err)
	}
	return &Builder{DataDir: data, CacheDir: cacheDir(), AgentPath: conformance.AgentBinary(t), Runtime: rt, Catalog: cat}, rt
}

func noLeaks(t *testing.T, b *Builder, rt *gvisor.Runtime) {
	t.Helper()
	if l := rt.Leaks(); len(l) > 0 {
		t.Fatalf("runtime leaks: %v", l)
	}
	ents, _ := os.ReadDir(filepath.Join(b.DataDir, "templates", "artifacts"))
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Fatalf("temporary artifact left: %s", e.Name())
		}
	}
}

// hostFile is a layer entry copied from the host.
func hostFile(t testing.TB, src, dst string) entry {
	b, err := os.ReadFile(src)
	if err != nil {
		t.Skipf("host file %s: %v", src, err)
	}
	return entry{name: dst, typ: tar.TypeReg, body: string(b), mode: 0o755}
}

// testImage is a two-layer image with a shell (dash and its libc from the
// host), a whiteout, a hard link and an image config to keep.
func testImage(t *testing.T) v1.Image {
	l1 := mkTar(t,
		hostFile(t, "/bin/dash", "bin/sh"),
		hostFile(t, "/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6"),
		hostFile(t, "/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
		entry{name: "etc/old", typ: tar.TypeReg, body: "old"},
		entry{name: "data/f", typ: tar.TypeReg, body: "v1"},
	)
	l2 := mkTar(t,
		entry{name: "etc/.wh.old", typ: tar.TypeReg},
		entry{name: "data/f", typ: tar.TypeReg, body: "v2"},
		entry{name: "data/g", typ: tar.TypeLink, link: "data/f"},
	)
	img := empty.Image
	for _, l := range [][]byte{l1, l2} {
		b := l
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			t.Fatal(err)
		}
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config.Entrypoint = []string{"/bin/app"}
	cf.Config.Cmd = []string{"--serve"}
	cf.Config.Env = []string{"FOO=bar", "PATH=/bin"}
	cf.Config.WorkingDir = "/data"
	cf.Config.User = "1000"
	img, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func checkImageTemplate(t *testing.T, b *Builder, rt *gvisor.Runtime, r Record) {
	t.Helper()
	if r.Phase != PhaseReady {
		t.Fatalf("phase %s (%s)", r.Phase, r.Reason)
	}
	if strings.Join(r.Entrypoint, " ") != "/bin/app" || strings.Join(r.Cmd, " ") != "--serve" ||
		r.Env["FOO"] != "bar" || r.Workdir != "/data" || r.User != "1000" {
		t.Fatalf("image config not kept: %+v", r)
	}
	if _, err := os.Lstat(filepath.Join(r.RootfsDir, "etc/old")); err == nil {
		t.Fatal("whiteout not applied")
	}
	f, _ := os.Stat(filepath.Join(r.RootfsDir, "data/f"))
	g, _ := os.Stat(filepath.Join(r.RootfsDir, "data/g"))
	if f == nil || g == nil || !os.SameFile(f, g) {
		t.Fatal("hard link not kept")
	}
	if st, err := os.Stat(r.Ext4Image); err != nil || st.Size() == 0 {
		t.Fatalf("ext4 image: %v", err)
	}
	ctx := context.Background()
	id := "sbx-" + r.ID
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: r.ID}); err != nil {
		t.Fatal(err)
	}
	defer rt.Destroy(ctx, id)
	res, err := conformance.Exec(ctx, rt, id, `read l < /data/g; echo "$l $FOO"; echo x > /tmp/new; read m < /tmp/new; echo $m`)
	if err != nil || res.Stdout != "v2 bar\nx\n" {
		t.Fatalf("exec in image sandbox: %+v %v", res, err)
	}
	// The sandbox wrote to its overlay, never to the template's rootfs.
	if _, err := os.Stat(filepath.Join(r.RootfsDir, "tmp/new")); err == nil {
		t.Fatal("sandbox wrote into the template's rootfs")
	}
}

func TestImageTarballAndLayout(t *testing.T) {
	b, rt := newBuilder(t)
	ctx := context.Background()
	img := testImage(t)
	dir := t.TempDir()
	tb := filepath.Join(dir, "img.tar")
	ref, _ := name.ParseReference("cube.test/img:v1")
	if err := tarball.WriteToFile(tb, ref, img); err != nil {
		t.Fatal(err)
	}
	lp, err := layout.Write(filepath.Join(dir, "layout"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		t.Fatal(err)
	}
	r, err := b.CreateFromImage(ctx, ImageRequest{TemplateID: "from-tarball", Source: ImageSource{Ref: tb}, DiskMB: 64, MemoryMB: 128})
	if err != nil {
		t.Fatal(err)
	}
	checkImageTemplate(t, b, rt, r)
	r2, err := b.CreateFromImage(ctx, ImageRequest{TemplateID: "from-layout", Source: ImageSource{Ref: "oci-layout:" + filepath.Join(dir, "layout")}, DiskMB: 64, MemoryMB: 128})
	if err != nil {
		t.Fatal(err)
	}
	checkImageTemplate(t, b, rt, r2)
	if r2.Digest != r.Digest {
		t.Errorf("same image, different artifacts: %s vs %s", r.Digest, r2.Digest)
	}
	if _, err := b.CreateFromImage(ctx, ImageRequest{TemplateID: "from-layout", Source: ImageSource{Ref: tb}}); !errs.Is(err, errs.AlreadyExists) {
		t.Fatalf("duplicate id: %v", err)
	}
	list, _ := b.Catalog.List(ctx)
	if len(list) != 2 {
		t.Fatalf("catalog: %+v", list)
	}
	// Shared artifacts survive deleting one template, go with the last.
	if err := b.Delete(ctx, "from-tarball"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(r2.RootfsDir); err != nil {
		t.Fatal("shared artifacts removed with the first template")
	}
	if err := b.Delete(ctx, "from-layout"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(b.ArtifactDir(r.Digest)); err == nil {
		t.Fatal("artifacts left after the last template went")
	}
	noLeaks(t, b, rt)
}

// A registry on loopback with basic auth.
func TestImageRegistry(t *testing.T) {
	b, rt := newBuilder(t)
	ctx := context.Background()
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "cube" || p != "secret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	ref, err := name.ParseReference(host+"/test/img:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, testImage(t), remote.WithAuth(&authn.Basic{Username: "cube", Password: "secret"})); err != nil {
		t.Fatal(err)
	}
	src := ImageSource{Ref: ref.String(), Username: "cube", Password: "secret", Insecure: true}
	r, err := b.CreateFromImage(ctx, ImageRequest{TemplateID: "from-registry", Source: src, DiskMB: 64, MemoryMB: 128})
	if err != nil {
		t.Fatal(err)
	}
	checkImageTemplate(t, b, rt, r)

	bad := func(id string, src ImageSource, kind errs.Kind) {
		t.Helper()
		r, err := b.CreateFromImage(ctx, ImageRequest{TemplateID: id, Source: src})
		if !errs.Is(err, kind) || r.Phase != PhaseFailed || r.Reason == "" {
			t.Fatalf("%s: err %v (kind %s), record %s %q; want %s", id, err, errs.KindOf(err), r.Phase, r.Reason, kind)
		}
		got, _ := b.Catalog.Get(ctx, id)
		if got.Phase != PhaseFailed {
			t.Fatalf("%s: catalog says %s", id, got.Phase)
		}
		t.Logf("%s: %s", id, r.Reason)
	}
	bad("no-such-image", ImageSource{Ref: host + "/test/nope:v1", Username: "cube", Password: "secret", Insecure: true}, errs.NotFound)
	bad("bad-password", ImageSource{Ref: ref.String(), Username: "cube", Password: "wrong", Insecure: true}, errs.Unauthenticated)
	noLeaks(t, b, rt)
}

func TestImageBadInput(t *testing.T) {
	b, rt := newBuilder(t)
	ctx := context.Background()
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.tar")
	os.WriteFile(junk, bytes.Repeat([]byte("not a tarball "), 100), 0o644)
	good := filepath.Join(dir, "good.tar")
	ref, _ := name.ParseReference("cube.test/img:v1")
	if err := tarball.WriteToFile(good, ref, testImage(t)); err != nil {
		t.Fatal(err)
	}
	whole, _ := os.ReadFile(good)
	cut := filepath.Join(dir, "cut.tar")
	os.WriteFile(cut, whole[:len(whole)*2/3], 0o644)

	fail := func(req ImageRequest, kind errs.Kind, want string) {
		t.Helper()
		r, err := b.CreateFromImage(ctx, req)
		if !errs.Is(err, kind) || r.Phase != PhaseFailed || !strings.Contains(r.Reason, want) {
			t.Fatalf("%s: err %v (kind %s), reason %q; want %s containing %q", req.TemplateID, err, errs.KindOf(err), r.Reason, kind, want)
		}
		t.Logf("%s: %s", req.TemplateID, r.Reason)
		noLeaks(t, b, rt)
	}
	fail(ImageRequest{TemplateID: "junk", Source: ImageSource{Ref: junk}}, errs.InvalidArgument, "tarball")
	fail(ImageRequest{TemplateID: "cut", Source: ImageSource{Ref: cut}}, errs.InvalidArgument, "")
	fail(ImageRequest{TemplateID: "missing", Source: ImageSource{Ref: "oci-layout:" + filepath.Join(dir, "nothing")}}, errs.InvalidArgument, "OCI layout")
	b.MaxImageMB = 1
	fail(ImageRequest{TemplateID: "too-big", Source: ImageSource{Ref: good}}, errs.TooLarge, "MB")
	b.MaxImageMB = 0
	tctx, cancel := context.WithTimeout(ctx, 4*time.Second)
	defer cancel()
	r, err := b.CreateFromImage(tctx, ImageRequest{TemplateID: "deaf", Source: ImageSource{Ref: good}, ProbePort: 4321, DiskMB: 64, MemoryMB: 128})
	if err == nil || r.Phase != PhaseFailed || !strings.Contains(r.Reason, "probe") {
		t.Fatalf("deaf probe: %v %+v", err, r)
	}
	t.Logf("deaf: %s", r.Reason)
	noLeaks(t, b, rt)
	if _, err := b.CreateFromImage(ctx, ImageRequest{TemplateID: "Bad/ID", Source: ImageSource{Ref: good}}); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("bad id: %v", err)
	}
}

func TestBuiltinBase(t *testing.T) {
	b, rt := newBuilder(t)
	ctx := context.Background()
	var phases []Phase
	b.OnUpdate = func(r Record) {
		if len(phases) == 0 || phases[len(phases)-1] != r.Phase {
			phases = append(phases, r.Phase)
		}
	}
	r, err := b.CreateBuiltin(ctx, "base")
	if err != nil {
		t.Fatal(err)
	}
	want := []Phase{PhasePending, PhasePulling, PhaseUnpacking, PhaseBuildingImage, PhaseBooting, PhaseProbing, PhaseSnapshotting, PhaseReady}
	if strings.Join(phaseStrings(phases), ",") != strings.Join(phaseStrings(want), ",") {
		t.Errorf("phases %v, want %v", phases, want)
	}
	r2, err := b.CreateBuiltin(ctx, "base")
	if err != nil || r2.JobID != r.JobID {
		t.Fatalf("second build not cached: %v %s/%s", err, r2.JobID, r.JobID)
	}
	// A runtime without the snapshot (as after switching the server between
	// gvisor and microvm) gets it baked from the cached artifacts.
	if err := rt.DeleteTemplate(ctx, "base"); err != nil {
		t.Fatal(err)
	}
	phases = nil
	r3, err := b.CreateBuiltin(ctx, "base")
	if err != nil || r3.JobID != r.JobID || r3.Phase != PhaseReady {
		t.Fatalf("re-bake: %v %s/%s %s", err, r3.JobID, r.JobID, r3.Phase)
	}
	if got := strings.Join(phaseStrings(phases), ","); got != "BOOTING,PROBING,SNAPSHOTTING,READY" {
		t.Errorf("re-bake phases %s", got)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "base-1", TemplateID: "base"}); err != nil {
		t.Fatal(err)
	}
	defer rt.Destroy(ctx, "base-1")
	res, err := conformance.Exec(ctx, rt, "base-1", "id -u user && test -d /home/user && test -x /usr/local/bin/cube-agent && python3 -c 'print(6*7)' && test -x /bin/bash")
	if err != nil || res.Stdout != "1000\n42\n" {
		t.Fatalf("base sandbox: %+v %v", res, err)
	}
}

func phaseStrings(ps []Phase) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = string(p)
	}
	return out
}

// The code-interpreter recipe's packages (its bake needs the real agent's
// :49999 server; the rootfs is checked here when cached).
func TestCodeInterpreterRootfs(t *testing.T) {
	rc, _ := Builtin("code-interpreter-v1")
	mirror, err := DebianMirror(rc.Suite)
	if err != nil {
		t.Skip(err)
	}
	dir := filepath.Join(cacheDir(), "rootfs", rc.Name+"-"+rc.Hash(mirror))
	if _, err := os.Stat(dir + ".done"); err != nil {
		t.Skip("code-interpreter rootfs not cached: make templates")
	}
	for _, p := range []string{"numpy", "pandas", "matplotlib", "ipykernel", "jupyter_client"} {
		if _, err := os.Stat(filepath.Join(dir, "usr/lib/python3/dist-packages", p)); err != nil {
			t.Errorf("python package %s missing", p)
		}
	}
}
