//go:build linux

package jail

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func TestCgroupLifecycle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	name := "test-" + strconv.Itoa(os.Getpid())
	c, err := CreateCgroup(name, Limits{MemoryBytes: 256 << 20, PidsMax: 64, CPUs: 1})
	if err != nil {
		t.Skipf("cgroups not writable here: %v", err)
	}
	defer c.Remove()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if err := c.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cgroup")
	if !strings.Contains(string(b), "cube-vmm/"+name) {
		t.Fatalf("child cgroups:\n%s", b)
	}
	if !c.V2 {
		for _, d := range c.Dirs {
			if strings.Contains(d, "/memory/") {
				v, _ := os.ReadFile(filepath.Join(d, "memory.limit_in_bytes"))
				if strings.TrimSpace(string(v)) != strconv.Itoa(256<<20) {
					t.Fatalf("memory limit %s", v)
				}
			}
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := c.Remove(); err != nil {
		t.Fatal(err)
	}
	for _, d := range c.Dirs {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Fatalf("%s still exists", d)
		}
	}
	if _, err := CreateCgroup("../evil", Limits{}); err == nil {
		t.Fatal("path-escaping name accepted")
	}
}

// TestValidName: the hand-written check accepts exactly what
// ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$ does.
func TestValidName(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)
	cases := []string{"", "a", "A9", "vmm-restore-123", "mv-0a1b2c3d4e-1-2", ".a", "-a", "_a", "a/b", "a b", "..",
		"a..", "ä", "a\n", strings.Repeat("a", 128), strings.Repeat("a", 129), "a" + strings.Repeat("-", 127)}
	for i := 0; i < 256; i++ {
		cases = append(cases, "x"+string(rune(i)), string(rune(i)))
	}
	for _, c := range cases {
		if got, want := ValidName(c), re.MatchString(c); got != want {
			t.Errorf("ValidName(%q) = %v, want %v", c, got, want)
		}
	}
}
