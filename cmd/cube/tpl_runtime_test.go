//go:build linux

package main

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/hostinfo"
)

// TestTplRuntime: `cube tpl --runtime` picks the runtime that bakes (the
// built binary). Off kvm-hardware, microvm (flag or CUBE_RUNTIME) fails
// fast naming the host kind, before the image is read and without a
// catalog record; an unknown name is refused. The microvm bake itself runs
// inside make vmtest (TestServerMicroVM).
func TestTplRuntime(t *testing.T) {
	kind := (hostinfo.Probe{}).Kind()
	bin := builtCube(t)
	data := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	run := func(env []string, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, bin, append([]string{"--data-dir", data}, args...)...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	image := []string{"create-from-image", "--image", "/nonexistent/image.tar", "--template-id", "x", "-q"}
	type tc struct{ env, args, want []string }
	cases := []tc{{serverEnv(), append([]string{"tpl", "--runtime", "bogus"}, image...), []string{`unknown runtime "bogus"`}}}
	if kind != hostinfo.KVMHardware {
		want := []string{"baking a microvm template needs hardware KVM", "this host is " + string(kind), "--runtime gvisor"}
		cases = append(cases,
			tc{serverEnv(), append([]string{"tpl", "--runtime", "microvm"}, image...), want},
			tc{serverEnv("CUBE_RUNTIME=microvm"), append([]string{"tpl"}, image...), want})
	}
	for _, c := range cases {
		out, err := run(c.env, c.args...)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("%v: want exit code 1, got %v: %s", c.args, err, out)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%v: output lacks %q:\n%s", c.args, w, out)
			}
		}
	}
	if out, err := run(serverEnv(), "tpl", "list", "--json"); err != nil || strings.Contains(out, `"id"`) {
		t.Fatalf("catalog after refused builds: %v %s", err, out)
	}
}
