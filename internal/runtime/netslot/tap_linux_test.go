//go:build linux

package netslot

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
)

// tapVMM stands in for the microVM runtime where no guest can boot: Create
// opens the slot's tap exactly as the node does for the VMM
// (network.OpenTap) and keeps it; nothing answers on it. Only its
// bookkeeping is fake; the slots, taps and Dial are real.
type tapVMM struct {
	runtime.Runtime // nil: unused methods panic
	mu              sync.Mutex
	boxes           map[string]*tapBox
	failCreate      bool
}

type tapBox struct {
	info runtime.Info
	tap  *os.File
}

func (v *tapVMM) Name() string { return "microvm" }

func (v *tapVMM) Create(_ context.Context, spec runtime.CreateSpec) (runtime.Info, error) {
	if v.failCreate {
		return runtime.Info{}, errs.E(errs.NotFound, "template %s not found", spec.TemplateID)
	}
	f, err := network.OpenTap(spec.Net, true)
	if err != nil {
		return runtime.Info{}, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	info := runtime.Info{ID: spec.ID, State: runtime.StateRunning, Net: spec.Net}
	v.boxes[spec.ID] = &tapBox{info: info, tap: f}
	return info, nil
}

func (v *tapVMM) Destroy(_ context.Context, id string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if b, ok := v.boxes[id]; ok {
		b.tap.Close()
		delete(v.boxes, id)
	}
	return nil
}

func (v *tapVMM) List(context.Context) ([]runtime.Info, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []runtime.Info
	for _, b := range v.boxes {
		out = append(out, b.info)
	}
	return out, nil
}

// TestTapSlot: the microVM path without a guest: the sandbox gets a
// tap-mode slot whose tap the runtime opens, Dial through the wrapper
// arrives on that tap as a SYN to the guest's address, a failed Create and
// Destroy release the slot, a restart re-adopts the surviving sandbox's
// slot with its policy and reaps the dead one's, and a runtime/mode
// mismatch is refused.
func TestTapSlot(t *testing.T) {
	ctx := context.Background()
	pfx := prefix + "t"
	mgr := newManager(t, pfx, tapRange, network.ModeTap)
	defer func() { mgr.Purge(); mgr.Close() }()
	dir := t.TempDir()
	vmm := &tapVMM{boxes: map[string]*tapBox{}}
	rt, err := Wrap(ctx, vmm, mgr, Options{StateDir: dir, Logger: testLog})
	if err != nil {
		t.Fatal(err)
	}

	// A failed Create gives its slot back.
	vmm.failCreate = true
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "fail", TemplateID: "none"}); !errs.Is(err, errs.NotFound) {
		t.Fatalf("failed create: %v", err)
	}
	vmm.failCreate = false
	if st := mgr.Stats(); st.Active != 0 {
		t.Fatalf("failed create left %d active slots", st.Active)
	}
	if _, err := os.Stat(filepath.Join(dir, "fail.json")); err == nil {
		t.Fatal("failed create left its record")
	}

	a, err := rt.CreateWithPolicy(ctx, runtime.CreateSpec{ID: "a"}, network.Policy{AllowInternetAccess: network.Bool(false)})
	if err != nil {
		t.Fatal(err)
	}
	if a.Net.Tap == "" || a.Net.NetnsPath != a.Net.RouterNetnsPath {
		t.Fatalf("microvm sandbox did not get a tap slot: %+v", a.Net)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "b"}); err != nil {
		t.Fatal(err)
	}
	bslot, _ := rt.Slot("b")
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "a"}); !errs.Is(err, errs.AlreadyExists) {
		t.Fatalf("duplicate: %v", err)
	}

	// Dial reaches the tap the "VMM" holds: a SYN to GuestIP:port.
	const port = 8080
	go func() {
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		if c, err := rt.Dial(dctx, "a", port); err == nil {
			c.Close()
		}
	}()
	vmm.mu.Lock()
	tap := vmm.boxes["a"].tap
	vmm.mu.Unlock()
	if !sawSYN(t, tap, netip.MustParseAddr(a.Net.GuestIP), port) {
		t.Fatal("no SYN for the sandbox's port on its tap")
	}

	// Restart: b dies while cube is down, a survives.
	mgr.Close()
	vmm.Destroy(ctx, "b")
	mgr = newManager(t, pfx, tapRange, network.ModeTap)
	rt, err = Wrap(ctx, vmm, mgr, Options{StateDir: dir, Logger: testLog})
	if err != nil {
		t.Fatal(err)
	}
	if s, err := rt.Slot("a"); err != nil || s.ID != a.Net.ID {
		t.Fatalf("a's slot after restart: %+v %v", s, err)
	}
	if p, err := rt.Policy("a"); err != nil || p.AllowInternetAccess == nil || *p.AllowInternetAccess {
		t.Fatalf("a's policy after restart: %+v %v", p, err)
	}
	if p, err := mgr.Policy(a.Net.ID); err != nil || p.AllowInternetAccess == nil || *p.AllowInternetAccess {
		t.Fatalf("a's slot policy after restart: %+v %v", p, err)
	}
	if _, err := os.Stat(bslot.RouterNetnsPath); err == nil {
		t.Fatalf("b's slot %s was not reaped", bslot.ID)
	}
	if _, err := rt.Slot("b"); !errs.Is(err, errs.NotFound) {
		t.Fatalf("b after restart: %v", err)
	}
	if err := rt.Destroy(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if !released(mgr, a.Net.ID) || mgr.Stats().Active != 0 {
		t.Fatal("destroy did not release the slot")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("records left: %v", ents)
	}

	// A gVisor runtime cannot use tap slots.
	if _, err := Wrap(ctx, gvisorName{}, mgr, Options{StateDir: dir, Logger: testLog}); !errs.Is(err, errs.FailedPrecondition) {
		t.Fatalf("gvisor on tap slots: %v, want FailedPrecondition", err)
	}
}

type gvisorName struct{ runtime.Runtime }

func (gvisorName) Name() string { return "gvisor" }

// sawSYN reads frames (after the 10-byte virtio-net header) from tap until
// a TCP SYN to addr:port shows up.
func sawSYN(t *testing.T, tap *os.File, addr netip.Addr, port int) bool {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	tap.SetReadDeadline(deadline)
	buf := make([]byte, 65536)
	for time.Now().Before(deadline) {
		n, err := tap.Read(buf)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return false
			}
			if os.IsTimeout(err) {
				return false
			}
			t.Fatal(err)
		}
		b := buf[:n]
		if len(b) < 10+54 {
			continue
		}
		b = b[10:]
		if binary.BigEndian.Uint16(b[12:]) != 0x0800 || b[23] != unix.IPPROTO_TCP {
			continue
		}
		ihl := int(b[14]&0x0f) * 4
		dst, _ := netip.AddrFromSlice(b[30:34])
		tcp := b[14+ihl:]
		if dst == addr && int(binary.BigEndian.Uint16(tcp[2:])) == port && tcp[13]&0x02 != 0 {
			return true
		}
	}
	return false
}

// FuzzCreateWithPolicy: what a client sends at create (sandbox id, policy
// lists, internet flag). Bad input is InvalidArgument and leaves nothing
// (no slot, no record, no sandbox); good input creates a sandbox whose
// slot carries exactly that policy.
func FuzzCreateWithPolicy(f *testing.F) {
	f.Add("sb-1", "10.0.0.0/8", "1.2.3.4", true)
	f.Add("../x", "", "", false)
	f.Add("ok", "*.example.com", "0.0.0.0/0", false)
	f.Add("ok", "10.0.0.0/33", "", true)
	f.Add("ok", "", "not-an-ip", true)
	f.Add("", "1.1.1.1", "", true)
	ctx := context.Background()
	mgr := newManager(f, prefix+"t", tapRange, network.ModeTap)
	f.Cleanup(func() { mgr.Purge() })
	dir := f.TempDir()
	vmm := &tapVMM{boxes: map[string]*tapBox{}}
	rt, err := Wrap(ctx, vmm, mgr, Options{StateDir: dir, Logger: testLog})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, id, allow, deny string, internet bool) {
		p := network.Policy{AllowInternetAccess: network.Bool(internet)}
		if allow != "" {
			p.AllowOut = []string{allow}
		}
		if deny != "" {
			p.DenyOut = []string{deny}
		}
		_, err := rt.CreateWithPolicy(ctx, runtime.CreateSpec{ID: id}, p)
		if err != nil {
			if !errs.Is(err, errs.InvalidArgument) {
				t.Fatalf("create %q %+v: %v (want InvalidArgument or success)", id, p, err)
			}
			if st := mgr.Stats(); st.Active != 0 {
				t.Fatalf("rejected create left %d active slots", st.Active)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("rejected create left records: %v", ents)
			}
			if l, _ := vmm.List(ctx); len(l) != 0 {
				t.Fatalf("rejected create reached the runtime: %v", l)
			}
			return
		}
		s, err := rt.Slot(id)
		if err != nil {
			t.Fatal(err)
		}
		got, err := mgr.Policy(s.ID)
		if err != nil || !reflect.DeepEqual(got, p) {
			t.Fatalf("slot policy %+v %v, want %+v", got, err, p)
		}
		if err := rt.Destroy(ctx, id); err != nil {
			t.Fatal(err)
		}
		if st := mgr.Stats(); st.Active != 0 {
			t.Fatalf("destroy left %d active slots", st.Active)
		}
	})
}
