package vmmapi

import (
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

func TestDiskParse(t *testing.T) {
	d, err := ParseDisk("base=/a/b.ext4,overlay=/c/d.cow,id=root")
	if err != nil || d != (Disk{Base: "/a/b.ext4", Overlay: "/c/d.cow", ID: "root"}) {
		t.Fatalf("%+v %v", d, err)
	}
	if d2, err := ParseDisk(d.String()); err != nil || d2 != d {
		t.Fatalf("round trip %+v %v", d2, err)
	}
	if d, err := ParseDisk("/x.img"); err != nil || d.Base != "/x.img" {
		t.Fatalf("%+v %v", d, err)
	}
	for _, bad := range []string{"", "overlay=/x", "base=/x,color=red", "base=/x,junk"} {
		if _, err := ParseDisk(bad); err == nil {
			t.Errorf("ParseDisk(%q) accepted", bad)
		}
	}
}

func TestOptionsArgs(t *testing.T) {
	o := Options{Kernel: "/k", KernelFormat: "raw", Cmdline: "console=ttyS0 -- -c 'a b'", MemMiB: 64, VCPUs: 2,
		Disks: []Disk{{Base: "/b", Overlay: "/o"}}, TapFD: 5, VsockUDS: "/v.sock", VsockCID: 7, RNG: true, NoStart: true}
	got := o.Args()
	want := []string{"--kernel=/k", "--kernel-format=raw", "--cmdline=console=ttyS0 -- -c 'a b'", "--mem=64", "--vcpus=2",
		"--disk=base=/b,overlay=/o", "--tap-fd=5", "--vsock-uds=/v.sock", "--vsock-cid=7", "--rng", "--no-start"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("args\n%q\nwant\n%q", got, want)
	}
}

type fakeCtl struct{ state string }

func (f *fakeCtl) Start() error {
	if f.state != "created" {
		return errs.E(errs.Conflict, "already started")
	}
	f.state = "running"
	return nil
}
func (f *fakeCtl) Pause() error     { f.state = "paused"; return nil }
func (f *fakeCtl) Resume() error    { f.state = "running"; return nil }
func (f *fakeCtl) Stop() error      { f.state = "stopped"; return nil }
func (f *fakeCtl) Status() Status   { return Status{State: f.state} }
func (f *fakeCtl) Metrics() Metrics { return Metrics{Snapshot: vm.Snapshot{State: f.state}} }
func (f *fakeCtl) VCPUs() ([]VCPURegs, error) {
	return []VCPURegs{{ID: 0, RIP: 0x100000}}, nil
}

func TestServerRoutes(t *testing.T) {
	ctl := &fakeCtl{state: "created"}
	h := NewServer(ctl, nil).http.Handler
	for _, c := range []struct {
		method, path string
		code         int
		body         string
	}{
		{"GET", "/status", 200, `"state":"created"`},
		{"POST", "/start", 200, `"state":"running"`},
		{"POST", "/start", 409, `"kind":"conflict"`},
		{"GET", "/pause", 404, "no such endpoint"},
		{"POST", "/pause", 200, `"paused"`},
		{"POST", "/snapshot", 501, "not supported"},
		{"DELETE", "/nope", 404, "no such endpoint"},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(c.method, c.path, nil))
		if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.body) {
			t.Errorf("%s %s = %d %s", c.method, c.path, rec.Code, rec.Body)
		}
	}
}

func FuzzServer(f *testing.F) {
	f.Add("POST", "/stop", "x")
	f.Add("GET", "/metrics/../status", "")
	f.Add("PUT", "//", strings.Repeat("a", 70000))
	f.Fuzz(func(t *testing.T, method, path, body string) {
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequest(method, "http://vmm"+path, strings.NewReader(body))
		if err != nil {
			return
		}
		rec := httptest.NewRecorder()
		NewServer(&fakeCtl{state: "created"}, nil).http.Handler.ServeHTTP(rec, req)
		if rec.Code == 0 || rec.Code >= 600 {
			t.Fatalf("code %d", rec.Code)
		}
	})
}

func FuzzParseDisk(f *testing.F) {
	f.Add("base=/a,overlay=/b,id=c")
	f.Add("/x")
	f.Add("base=,=,")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDisk(s)
		if err != nil {
			return
		}
		if d.Base == "" {
			t.Fatal("accepted a disk without a base")
		}
		if !strings.ContainsAny(d.Base+d.Overlay+d.ID, ",") {
			if d2, err := ParseDisk(d.String()); err != nil || d2 != d {
				t.Fatalf("round trip of %q: %+v %v", s, d2, err)
			}
		}
	})
}
