package conformance

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// placeholderMarker is printed by the cmd/cube-agent placeholder that
// stands in until the real agent lands.
const placeholderMarker = "not yet implemented (issue 2)"

var (
	agentOnce sync.Once
	agentPath string
	agentErr  error
	agentNote string
)

// AgentBinary returns a static cube-agent for templates in tests:
// $CUBE_BIN/cube-agent when set (make test builds it), else a fresh
// CGO_ENABLED=0 build of ./cmd/cube-agent. While that is still the
// placeholder, it returns the conformance test agent
// (internal/runtime/conformance/testagent) and says so in the test log.
func AgentBinary(t testing.TB) string {
	t.Helper()
	agentOnce.Do(func() {
		// A fixed place (overwritten by every run) rather than a temp dir
		// nobody removes.
		cache := os.Getenv("CUBE_CACHE_DIR")
		if cache == "" {
			cache = "/var/cache/cube"
		}
		dir := filepath.Join(cache, "test-agent")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			agentErr = err
			return
		}
		mod, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			agentErr = err
			return
		}
		root := filepath.Dir(strings.TrimSpace(string(mod)))
		build := func(pkg, out string) error {
			tmp := out + ".tmp-" + strconv.Itoa(os.Getpid())
			defer os.Remove(tmp)
			cmd := exec.Command("go", "build", "-trimpath", "-o", tmp, pkg)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if b, err := cmd.CombinedOutput(); err != nil {
				return &buildError{pkg, string(b), err}
			}
			return os.Rename(tmp, out) // atomic: other test binaries may run it
		}
		p := ""
		if bin := os.Getenv("CUBE_BIN"); bin != "" {
			if _, err := os.Stat(filepath.Join(bin, "cube-agent")); err == nil {
				p = filepath.Join(bin, "cube-agent")
			}
		}
		if p == "" {
			p = filepath.Join(dir, "cube-agent")
			if agentErr = build("./cmd/cube-agent", p); agentErr != nil {
				return
			}
		}
		if b, _ := os.ReadFile(p); bytes.Contains(b, []byte(placeholderMarker)) {
			p = filepath.Join(dir, "testagent")
			if agentErr = build("./internal/runtime/conformance/testagent", p); agentErr != nil {
				return
			}
			agentNote = "cmd/cube-agent is still the placeholder: using the conformance test agent"
		}
		agentPath = p
	})
	if agentErr != nil {
		t.Fatalf("agent binary: %v", agentErr)
	}
	if agentNote != "" {
		t.Log(agentNote)
	}
	return agentPath
}

type buildError struct {
	pkg, out string
	err      error
}

func (e *buildError) Error() string { return "go build " + e.pkg + ": " + e.err.Error() + ": " + e.out }
