//go:build linux

package template

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type entry struct {
	name, link, body string
	typ              byte
	mode             int64
}

func mkTar(t testing.TB, es ...entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0)}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

func apply(t testing.TB, root string, limit int64, layers ...[]byte) error {
	u, err := newUnpacker(root, limit)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for _, l := range layers {
		if err := u.applyLayer(bytes.NewReader(l)); err != nil {
			return err
		}
	}
	return nil
}

func read(t testing.TB, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return "<" + err.Error() + ">"
	}
	return string(b)
}

func TestUnpackLayers(t *testing.T) {
	root := t.TempDir()
	l1 := mkTar(t,
		entry{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		entry{name: "etc/a", typ: tar.TypeReg, body: "a1"},
		entry{name: "etc/gone", typ: tar.TypeReg, body: "x"},
		entry{name: "opq/", typ: tar.TypeDir, mode: 0o755},
		entry{name: "opq/old", typ: tar.TypeReg, body: "old"},
		entry{name: "bin/tool", typ: tar.TypeReg, body: "tool", mode: 0o755},
		entry{name: "bin/alias", typ: tar.TypeLink, link: "bin/tool"},
		entry{name: "lnk", typ: tar.TypeSymlink, link: "/etc/a"},
		entry{name: "fifo", typ: tar.TypeFifo},
		entry{name: "dev/null", typ: tar.TypeChar},
	)
	l2 := mkTar(t,
		entry{name: "etc/.wh.gone", typ: tar.TypeReg},
		entry{name: "etc/a", typ: tar.TypeReg, body: "a2"},
		entry{name: "opq/", typ: tar.TypeDir, mode: 0o755},
		entry{name: "opq/.wh..wh..opq", typ: tar.TypeReg},
		entry{name: "opq/new", typ: tar.TypeReg, body: "new"},
		entry{name: "./x/../y", typ: tar.TypeReg, body: "y"},
	)
	if err := apply(t, root, 0, l1, l2); err != nil {
		t.Fatal(err)
	}
	checks := map[string]string{"etc/a": "a2", "opq/new": "new", "bin/alias": "tool", "y": "y"}
	for p, want := range checks {
		if got := read(t, filepath.Join(root, p)); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	for _, p := range []string{"etc/gone", "opq/old", "dev/null"} {
		if _, err := os.Lstat(filepath.Join(root, p)); err == nil {
			t.Errorf("%s should not exist", p)
		}
	}
	a, _ := os.Stat(filepath.Join(root, "bin/tool"))
	b, _ := os.Stat(filepath.Join(root, "bin/alias"))
	if !os.SameFile(a, b) || a.Mode().Perm() != 0o755 {
		t.Errorf("hard link not preserved: %v %v", a, b)
	}
	if l, _ := os.Readlink(filepath.Join(root, "lnk")); l != "/etc/a" {
		t.Errorf("symlink target %q", l)
	}
}

// Hostile layers must not touch anything outside the root.
func TestUnpackTraversal(t *testing.T) {
	outer := t.TempDir()
	root := filepath.Join(outer, "root")
	os.Mkdir(root, 0o755)
	sentinel := filepath.Join(outer, "sentinel")
	os.WriteFile(sentinel, []byte("keep"), 0o644)
	cases := map[string][]byte{
		"dotdot":        mkTar(t, entry{name: "../escape", typ: tar.TypeReg, body: "x"}),
		"abs symlink":   mkTar(t, entry{name: "l", typ: tar.TypeSymlink, link: outer}, entry{name: "l/escape", typ: tar.TypeReg, body: "x"}),
		"rel symlink":   mkTar(t, entry{name: "l2", typ: tar.TypeSymlink, link: "../../.."}, entry{name: "l2/escape", typ: tar.TypeReg, body: "x"}),
		"hardlink out":  mkTar(t, entry{name: "h", typ: tar.TypeLink, link: "../sentinel"}),
		"whiteout out":  mkTar(t, entry{name: "l3", typ: tar.TypeSymlink, link: outer}, entry{name: "l3/.wh.sentinel", typ: tar.TypeReg}),
		"opaque out":    mkTar(t, entry{name: "l4", typ: tar.TypeSymlink, link: outer}, entry{name: "l4/.wh..wh..opq", typ: tar.TypeReg}),
		"overwrite via": mkTar(t, entry{name: "s", typ: tar.TypeSymlink, link: sentinel}, entry{name: "s", typ: tar.TypeReg, body: "x"}),
	}
	for name, layer := range cases {
		apply(t, root, 0, layer) // may fail; must not escape
		if got := read(t, sentinel); got != "keep" {
			t.Fatalf("%s: sentinel = %q", name, got)
		}
		ents, _ := os.ReadDir(outer)
		if len(ents) != 2 {
			t.Fatalf("%s: something was created outside the root: %v", name, ents)
		}
	}
}

func TestUnpackLimit(t *testing.T) {
	root := t.TempDir()
	l := mkTar(t, entry{name: "big", typ: tar.TypeReg, body: strings.Repeat("x", 3<<20)})
	err := apply(t, root, 1<<20, l)
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err = %v, want a size error", err)
	}
}

func TestUnpackCorrupt(t *testing.T) {
	l := mkTar(t, entry{name: "a", typ: tar.TypeReg, body: strings.Repeat("x", 2048)})
	if err := apply(t, t.TempDir(), 0, l[:700]); err == nil {
		t.Fatal("truncated layer accepted")
	}
}

// FuzzUnpack feeds arbitrary tar streams; whatever happens, nothing
// outside the root changes.
func FuzzUnpack(f *testing.F) {
	f.Add(mkTar(f, entry{name: "a/b", typ: tar.TypeReg, body: "x"}))
	f.Add(mkTar(f, entry{name: "l", typ: tar.TypeSymlink, link: "/"}, entry{name: "l/x", typ: tar.TypeReg, body: "x"}))
	f.Add(mkTar(f, entry{name: "../../x", typ: tar.TypeLink, link: "../../etc/passwd"}))
	f.Add(mkTar(f, entry{name: "d/.wh..wh..opq", typ: tar.TypeReg}, entry{name: ".wh...", typ: tar.TypeReg}))
	f.Fuzz(func(t *testing.T, layer []byte) {
		outer := t.TempDir()
		root := filepath.Join(outer, "root")
		os.Mkdir(root, 0o755)
		os.WriteFile(filepath.Join(outer, "sentinel"), []byte("keep"), 0o644)
		apply(t, root, 1<<20, layer)
		if got := read(t, filepath.Join(outer, "sentinel")); got != "keep" {
			t.Fatalf("sentinel = %q", got)
		}
		if ents, _ := os.ReadDir(outer); len(ents) != 2 {
			t.Fatalf("created outside the root: %v", ents)
		}
	})
}

func TestMirrorIn(t *testing.T) {
	deb822 := "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://security/debian-security\nSuites: bookworm-security\n"
	if m := mirrorIn(deb822, "bookworm", true); m != "http://deb.debian.org/debian" {
		t.Errorf("deb822: %q", m)
	}
	list := "# c\ndeb [arch=amd64 signed-by=/x] http://m.example/debian bookworm main\n"
	if m := mirrorIn(list, "bookworm", false); m != "http://m.example/debian" {
		t.Errorf("list: %q", m)
	}
	if m := mirrorIn(list, "trixie", false); m != "" {
		t.Errorf("other suite: %q", m)
	}
}
