package hostinfo

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fakeHost(t *testing.T, files map[string]string) Probe {
	root := t.TempDir()
	for p, c := range files {
		full := filepath.Join(root, p)
		os.MkdirAll(filepath.Dir(full), 0o755)
		if strings.HasSuffix(p, "/") {
			os.MkdirAll(full, 0o755)
			continue
		}
		os.WriteFile(full, []byte(c), 0o644)
	}
	return Probe{Root: root}
}

func TestKind(t *testing.T) {
	cases := []struct {
		files map[string]string
		want  Kind
	}{
		{map[string]string{}, NoKVM},
		{map[string]string{"/dev/kvm": "", "/sys/module/kvm_pvm/": ""}, KVMPVM},
		{map[string]string{"/dev/kvm": "", "/sys/module/kvm_intel/": "", "/proc/cpuinfo": "flags\t: fpu vmx sse\n"}, KVMHardware},
		{map[string]string{"/dev/kvm": "", "/sys/module/kvm_amd/": "", "/proc/cpuinfo": "flags\t: fpu svm\n"}, KVMHardware},
		{map[string]string{"/dev/kvm": "", "/proc/cpuinfo": "flags\t: fpu sse\n"}, NoKVM},
	}
	for i, c := range cases {
		if got := fakeHost(t, c.files).Kind(); got != c.want {
			t.Errorf("case %d: %s, want %s", i, got, c.want)
		}
	}
	if RuntimeFor(KVMHardware) != "microvm" || RuntimeFor(KVMPVM) != "gvisor" {
		t.Fatal("runtime choice")
	}
}

// TestThisHost runs the real probe on this machine and checks the report
// names a kind and a runtime.
func TestThisHost(t *testing.T) {
	var b bytes.Buffer
	Probe{}.Report(&b)
	out := b.String()
	if !strings.Contains(out, "host kind: ") || !strings.Contains(out, "runtime: ") {
		t.Fatalf("report: %s", out)
	}
	t.Log(out)
}
