//go:build linux

package reaper

import (
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReapOrphansSparesManaged makes the test process a child subreaper
// (as PID 1 is), creates an orphan zombie and a managed child, and checks
// that only the orphan is reaped: the managed child's Wait still sees its
// exit status.
func TestReapOrphansSparesManaged(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("cannot become a subreaper: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

	managed := exec.Command("/bin/sh", "-c", "exit 3")
	if err := Start(managed, managed.Start); err != nil {
		t.Fatal(err)
	}
	orphanMaker := exec.Command("/bin/sh", "-c", "(sleep 0.1 &) ; exit 0")
	if err := Start(orphanMaker, orphanMaker.Start); err != nil {
		t.Fatal(err)
	}
	if err := orphanMaker.Wait(); err != nil {
		t.Fatal(err)
	}
	Done(orphanMaker.Process.Pid)
	time.Sleep(300 * time.Millisecond) // managed has exited too: both are zombies now
	reaped := 0
	for i := 0; i < 200 && reaped == 0; i++ { // up to 10 s on a loaded host
		reaped += ReapOrphans()
		time.Sleep(50 * time.Millisecond)
	}
	if reaped != 1 {
		t.Fatalf("reaped %d orphans, want 1", reaped)
	}
	err := managed.Wait()
	Done(managed.Process.Pid)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Fatalf("managed child's status was stolen: %v", err)
	}
}
