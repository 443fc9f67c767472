//go:build linux

package vmmspec

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// TestBuildDisks opens real disk images (read-only alone, and under a
// copy-on-write overlay) and checks the device names and order.
func TestBuildDisks(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.img")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	o := vmmapi.Options{RNG: true, Disks: []vmmapi.Disk{
		{Base: base},
		{Base: base, Overlay: filepath.Join(dir, "x.cow"), ID: "root"},
	}}
	s, cleanup, err := Build(o, Extra{NoKernel: true})
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	var names []string
	for _, v := range s.Virtio {
		names = append(names, v.Name)
	}
	if got := strings.Join(names, ","); got != "blk-disk0,blk-root,rng0" {
		t.Fatalf("devices %s", got)
	}
	disk, id, err := OpenDisk(3, vmmapi.Disk{Base: base})
	if err != nil || id != "disk3" || !disk.ReadOnly() || disk.Size() != 1<<20 {
		t.Fatalf("OpenDisk: %v %q %v", disk, id, err)
	}
	disk.Close()

	o.Disks = append(o.Disks, vmmapi.Disk{Base: filepath.Join(dir, "missing.img")})
	if _, _, err := Build(o, Extra{NoKernel: true}); err == nil || !strings.Contains(err.Error(), "disk 2") {
		t.Fatalf("missing disk: %v", err)
	}
	if d, _, err := OpenDisk(0, vmmapi.Disk{Base: filepath.Join(dir, "missing.img")}); err == nil || d != nil {
		t.Fatalf("OpenDisk of a missing image: %v %v", d, err)
	}
}
