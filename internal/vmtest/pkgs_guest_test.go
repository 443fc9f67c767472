//go:build linux && vmtest

package vmtest

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPackagesOnRealKVM runs the VMM packages' own tests (compiled by
// test/vmtest/image.sh into /vmtest/pkg/*.test) inside L1, where /dev/kvm is
// the real kvm_amd rather than the host's KVM-PVM: the same synthetic-guest
// tests, now also at CPL 0 through real SVM with nested paging.
func TestPackagesOnRealKVM(t *testing.T) {
	bins, _ := filepath.Glob(filepath.Join(dir(t), "pkg", "*.test"))
	if len(bins) == 0 {
		t.Skip("no package test binaries in the image (no VMM packages with tests in this tree)")
	}
	args := []string{"-test.v", "-test.short", "-test.timeout=4m"}
	// pkg/skip: known failures on real KVM (VMTEST_PKG_SKIP, see
	// test/vmtest/image.sh), named on the console every run.
	if b, err := os.ReadFile(filepath.Join(dir(t), "pkg", "skip")); err == nil {
		if skip := strings.TrimSpace(string(b)); skip != "" {
			t.Logf("KNOWN FAILURES skipped (VMTEST_PKG_SKIP): %s", skip)
			args = append(args, "-test.skip", skip)
		}
	}
	for _, bin := range bins {
		bin := bin
		t.Run(strings.TrimSuffix(filepath.Base(bin), ".test"), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, args...)
			cmd.Dir = t.TempDir()
			// The packages' process tests exec $CUBE_BIN/cube.
			cmd.Env = append(os.Environ(), "CUBE_BIN="+dir(t))
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = cmd.Stdout
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			sc := bufio.NewScanner(out)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				// Indent so that the host's Report does not count the
				// package's own results as guest-side tests.
				t.Log("  | " + sc.Text())
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%s: %v", filepath.Base(bin), err)
			}
		})
	}
}

// dir is where the L1 /init put the image's files (CUBE_VMTEST_DIR).
func dir(t *testing.T) string {
	d := os.Getenv("CUBE_VMTEST_DIR")
	if d == "" {
		t.Fatal("CUBE_VMTEST_DIR is not set (run inside the L1 machine: make vmtest)")
	}
	return d
}
