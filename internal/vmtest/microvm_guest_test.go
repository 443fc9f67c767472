//go:build linux && vmtest

package vmtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
	"github.com/cubesandbox/cube/internal/runtime/microvm"
)

// TestMicroVMRuntime (issue 7) runs the microVM runtime on real KVM:
// bake a template from the busybox root disk with cube-agent as PID 1
// (boot, probe over vsock, snapshot), restore two clones and run commands
// through the agent (they draw different random bytes and see the host's
// wall-clock time), pause/resume keeps a running process and a file, a
// fork snapshot carries the file to a new sandbox, then the runtime
// conformance suite.
func TestMicroVMRuntime(t *testing.T) {
	d := dir(t)
	bin := filepath.Join(d, "cube")
	rt, err := microvm.New(microvm.Options{Dir: t.TempDir(), Kernel: filepath.Join(d, "guest", "bzImage"),
		CubeBin: bin, PoolSize: 1, BootTimeout: 4 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	defer func() {
		if !t.Failed() {
			return
		}
		// Every VMM's log and guest console under the runtime's
		// directory (pool VMMs, sandboxes, the template bake), tails only.
		filepath.Walk(rt.Dir(), func(p string, fi os.FileInfo, err error) error {
			if err != nil || fi.IsDir() || !strings.HasSuffix(p, ".log") {
				return nil
			}
			b, _ := os.ReadFile(p)
			if len(b) > 6000 {
				b = b[len(b)-6000:]
			}
			t.Logf("%s (last %d bytes):\n%s", strings.TrimPrefix(p, rt.Dir()), len(b), b)
			return nil
		})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	t0 := time.Now()
	tpl := runtime.Template{ID: "busybox", Ext4Image: filepath.Join(d, "guest", "rootfs.ext4"),
		Cmd: []string{"/sbin/cube-agent", "--default-user", "root"}, Resources: runtime.Resources{MemoryMB: 256, CPUCount: 1}}
	if err := rt.BakeTemplate(ctx, tpl); err != nil {
		t.Fatalf("bake: %v", err)
	}
	t.Logf("template baked in %.1fs", time.Since(t0).Seconds())
	run := func(id, script string) string {
		t.Helper()
		r, err := conformance.Exec(ctx, rt, id, script)
		if err != nil || r.ExitCode != 0 {
			for _, f := range []string{"vmm.log", "serial.log"} {
				b, _ := os.ReadFile(filepath.Join(rt.Dir(), "sandboxes", id, f))
				t.Logf("%s %s:\n%s", id, f, b)
			}
			t.Fatalf("%s: %q: %+v %v", id, script, r, err)
		}
		return r.Stdout
	}
	var outs []string
	for _, id := range []string{"clone-a", "clone-b"} {
		t0 := time.Now()
		if _, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: tpl.ID}); err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
		t.Logf("%s restored and initialised in %.0f ms", id, float64(time.Since(t0).Microseconds())/1000)
		defer rt.Destroy(context.Background(), id)
		out := run(id, "head -c 16 /dev/urandom | od -An -tx1; date +%s")
		outs = append(outs, out)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		sec, err := strconv.ParseInt(strings.TrimSpace(lines[len(lines)-1]), 10, 64)
		if err != nil || time.Since(time.Unix(sec, 0)).Abs() > 30*time.Second {
			t.Fatalf("%s: guest time %q, host %d", id, out, time.Now().Unix())
		}
	}
	if strings.Split(outs[0], "\n")[0] == strings.Split(outs[1], "\n")[0] {
		t.Fatalf("two clones drew the same random bytes: %q", outs)
	}

	run("clone-a", "echo kept > /tmp/f; sleep 1000 >/dev/null 2>&1 & echo started")
	pid := strings.TrimSpace(run("clone-a", "pidof sleep"))
	if err := rt.Pause(ctx, "clone-a"); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if _, err := rt.Resume(ctx, "clone-a", runtime.NetSlot{}); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if got := run("clone-a", "cat /tmp/f; pidof sleep"); got != "kept\n"+pid+"\n" {
		t.Fatalf("after pause/resume: %q, want file and sleep pid %s", got, pid)
	}
	if _, err := rt.Snapshot(ctx, "clone-a", "fork1"); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	defer rt.DeleteSnapshot(context.Background(), "fork1")
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "forked", SnapshotID: "fork1"}); err != nil {
		t.Fatalf("create from fork: %v", err)
	}
	defer rt.Destroy(context.Background(), "forked")
	if got := run("forked", "cat /tmp/f"); got != "kept\n" {
		t.Fatalf("forked sandbox: %q", got)
	}
	if st, err := rt.Stats(ctx, "forked"); err != nil || st.MemUsed == 0 {
		t.Fatalf("stats %+v %v", st, err)
	} else {
		t.Logf("forked sandbox VMM PSS %.1f MiB", float64(st.MemUsed)/(1<<20))
	}

	conformance.Run(t, conformance.Harness{
		Runtime: rt, Template: tpl.ID, Timeout: 4 * time.Minute,
		Footprint: func(id string) (any, error) {
			return filepath.Join(rtDir(rt), "sandboxes", id), nil
		},
		Leftovers: func(fp any) []string {
			if _, err := os.Stat(fp.(string)); err == nil {
				return []string{fmt.Sprint(fp)}
			}
			return nil
		},
	})
}

func rtDir(rt *microvm.Runtime) string { return rt.Dir() }
