//go:build linux

// Package reaper lets cube-agent reap orphaned zombies when it is PID 1
// without stealing the exit status of the processes it started itself
// (os/exec waits for those). Every child the agent starts goes through
// Start, which registers its pid under a lock the reaper also takes.
package reaper

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

var (
	lock    sync.RWMutex // Start holds R, ReapOrphans holds W
	mu      sync.Mutex   // guards managed
	managed = map[int]struct{}{}
)

// Start runs start (which starts cmd, e.g. cmd.Start or a PTY start) and
// registers cmd's pid as managed. Call Done after cmd.Wait returns.
func Start(cmd *exec.Cmd, start func() error) error {
	lock.RLock()
	defer lock.RUnlock()
	if err := start(); err != nil {
		return err
	}
	mu.Lock()
	managed[cmd.Process.Pid] = struct{}{}
	mu.Unlock()
	return nil
}

// Done forgets a managed pid.
func Done(pid int) {
	mu.Lock()
	delete(managed, pid)
	mu.Unlock()
}

// ReapOrphans waits for every zombie child that no one else waits for.
// Children started between the scan and the wait cannot be confused with
// orphans: Start holds the read lock until their pid is registered.
func ReapOrphans() int {
	lock.Lock()
	defer lock.Unlock()
	n := 0
	self := os.Getpid()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		mu.Lock()
		_, ok := managed[pid]
		mu.Unlock()
		if ok {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 || f[0] != "Z" {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid != self {
			continue
		}
		var ws unix.WaitStatus
		if p, _ := unix.Wait4(pid, &ws, unix.WNOHANG, nil); p == pid {
			n++
		}
	}
	return n
}
