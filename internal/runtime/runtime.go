// Package runtime defines the node-side sandbox runtime interface. Two
// implementations exist behind it: "microvm" (internal/runtime/microvm, one
// cube VMM process per sandbox on KVM) and "gvisor" (internal/runtime/gvisor,
// runsc per sandbox). Both must pass internal/runtime/conformance.
//
// Contract for every implementation:
//   - Methods are safe for concurrent use; operations on one sandbox are
//     serialised by the implementation.
//   - Destroy is idempotent and works on running and paused sandboxes; it
//     leaves nothing behind (processes, mounts, files, cgroups).
//   - Errors carry an errs.Kind: NotFound for unknown ids, Conflict for an
//     operation in the wrong state, InvalidArgument for bad specs.
//   - State survives a restart of the cube process: List reports sandboxes
//     that are still running or paused, and the runtime re-adopts them.
package runtime

import (
	"context"
	"encoding/json"
	"net"
	"time"
)

// State is a sandbox's runtime state.
type State string

const (
	StateRunning State = "running"
	StatePaused  State = "paused"
	StateStopped State = "stopped"
)

// NetSlot is the network a sandbox runs in, handed out by internal/network.
// A zero NetSlot means "a private network namespace with loopback only".
type NetSlot struct {
	ID        string // slot id
	NetnsPath string // /run/netns/<name> the sandbox joins
	Tap       string // tap device inside the netns (microvm runtime)
	GuestIP   string // address the sandbox uses (same in every slot)
	GatewayIP string // its gateway
	PrefixLen int
	GuestMAC  string
	HostIP    string // unique host-side address of this slot
	DNS       string // resolver the guest should use (the slot's DNS forwarder)
	// RouterNetnsPath is the slot's router namespace (where Tap lives in tap
	// mode and where the policy and DNS forwarder run); equals NetnsPath in tap mode.
	RouterNetnsPath string
}

// Resources are the sandbox's limits.
type Resources struct {
	CPUCount int // vCPUs / CPU quota in cores
	MemoryMB int
	DiskMB   int // writable layer size
}

// CreateSpec describes a sandbox to create.
type CreateSpec struct {
	ID          string // sandbox id, chosen by the caller
	TemplateID  string // template to restore from
	SnapshotID  string // if set, restore this snapshot (fork) instead of the template's
	Resources   Resources
	Env         map[string]string // environment for the agent (/init)
	AccessToken string            // envd access token ("" = none)
	// SnapshotAccessToken is the envd token the agent in SnapshotID holds
	// (its source sandbox's, "" = none): the agent accepts a new token and
	// environment only from a caller that presents it.
	SnapshotAccessToken string
	Net                 NetSlot
	Labels              map[string]string
}

// Info describes a sandbox known to a runtime.
type Info struct {
	ID         string
	TemplateID string
	State      State
	StartedAt  time.Time
	Net        NetSlot
	Resources  Resources
	Labels     map[string]string
}

// Stats is a point-in-time usage sample.
type Stats struct {
	Timestamp  time.Time
	CPUCount   int
	CPUUsedPct float64
	MemUsed    uint64 // bytes
	MemTotal   uint64
	DiskUsed   uint64
	DiskTotal  uint64
}

// Snapshot identifies a snapshot taken of a running sandbox (fork).
type Snapshot struct {
	ID         string
	SandboxID  string
	TemplateID string
	CreatedAt  time.Time
	Dir        string // where the runtime keeps it
}

// Template is what a runtime needs to bake a template snapshot: boot the
// prepared root filesystem with cube-agent, wait for the probe, snapshot.
type Template struct {
	ID        string
	RootfsDir string // unpacked root filesystem (gvisor)
	Ext4Image string // ext4 image of the same content (microvm)
	Resources Resources
	Env       map[string]string
	// Cmd is the container's init command; default /usr/local/bin/cube-agent
	// (the template builder injects the agent there).
	Cmd       []string
	Workdir   string // default /
	ProbePort int    // default 49983
	ProbePath string // default /health
	// ExtraProbes are further HTTP ports that must answer 2xx on /health
	// before the snapshot is taken (49999 for code-interpreter).
	ExtraProbes []int
	// StartCmd, if set, is the template's start command (argv): the agent
	// starts it in the background (StartCmdEnv in its environment or in
	// /init's envVars) and the bake snapshots only once it is ready, so
	// every sandbox restored from the template has it running already.
	StartCmd []string
	// ReadyCmd, if set, is a shell command (/bin/sh -c) the bake runs
	// through the agent until it exits 0 before the snapshot, at most
	// ReadyTimeout (default DefaultReadyTimeout). Without one, a start
	// command must keep running for a short settle (DefaultSettle).
	ReadyCmd     string
	ReadyTimeout time.Duration
	// Progress, if set, is told the bake's steps: "booting", "probing",
	// "ready" (start and ready commands), "snapshotting".
	Progress func(step string) `json:"-"`
}

// StartCmdEnv is the variable that hands the agent the start command (a
// JSON array of strings); the agent removes it from the sandbox's env.
const StartCmdEnv = "CUBE_START_CMD"

// Defaults of the start command's ready check.
const (
	DefaultReadyTimeout = 60 * time.Second
	DefaultSettle       = time.Second
)

// AgentEnv is the environment the bake hands the agent: Env plus the start
// command (StartCmdEnv).
func (t Template) AgentEnv() map[string]string {
	env := make(map[string]string, len(t.Env)+1)
	for k, v := range t.Env {
		env[k] = v
	}
	delete(env, StartCmdEnv)
	if len(t.StartCmd) > 0 {
		b, _ := json.Marshal(t.StartCmd)
		env[StartCmdEnv] = string(b)
	}
	return env
}

// DefaultAgentPath is where templates carry cube-agent.
const DefaultAgentPath = "/usr/local/bin/cube-agent"

// Runtime is the node-side sandbox runtime.
type Runtime interface {
	// Name is "microvm" or "gvisor".
	Name() string
	// BakeTemplate boots t, waits for its probe and stores its snapshot so
	// that Create can restore from it. Idempotent per t.ID.
	BakeTemplate(ctx context.Context, t Template) error
	// DeleteTemplate removes a baked template snapshot.
	DeleteTemplate(ctx context.Context, templateID string) error
	// Create restores a new sandbox from a template (or snapshot).
	Create(ctx context.Context, spec CreateSpec) (Info, error)
	// Pause snapshots the sandbox to disk and frees its memory and CPU.
	Pause(ctx context.Context, id string) error
	// Resume brings a paused sandbox back with memory and processes intact.
	// net may differ from the one it was paused on.
	Resume(ctx context.Context, id string, net NetSlot) (Info, error)
	// Snapshot takes a snapshot of a running sandbox and lets it continue
	// (fork). The snapshot can be used as CreateSpec.SnapshotID. A runtime
	// may also snapshot a paused sandbox (leaving it paused); one that
	// cannot answers errs.Conflict and the node resumes, snapshots and
	// pauses it again.
	Snapshot(ctx context.Context, id, snapshotID string) (Snapshot, error)
	// DeleteSnapshot removes a snapshot.
	DeleteSnapshot(ctx context.Context, snapshotID string) error
	// Destroy stops the sandbox and removes everything it had.
	Destroy(ctx context.Context, id string) error
	// Dial connects to a TCP port inside the sandbox.
	Dial(ctx context.Context, id string, port int) (net.Conn, error)
	// Stats returns the sandbox's current usage.
	Stats(ctx context.Context, id string) (Stats, error)
	// List returns the sandboxes this runtime knows (running and paused).
	List(ctx context.Context) ([]Info, error)
	// Close releases the runtime's resources (pools) but leaves sandboxes
	// running so that a restarted process can re-adopt them.
	Close() error
}

// SnapshotLister is implemented by runtimes that can list the snapshots
// they keep, so that a node can remove what a crash left behind (the
// temporary snapshot of an interrupted fork, a snapshot whose record was
// never written, a half-written or half-deleted one).
type SnapshotLister interface {
	ListSnapshots(ctx context.Context) ([]SnapshotEntry, error)
}

// SnapshotEntry is one snapshot a runtime keeps.
type SnapshotEntry struct {
	ID string
	// Complete is false for a snapshot whose writing or deletion was
	// interrupted: it cannot be restored and is only fit for deletion
	// (DeleteSnapshot removes it).
	Complete bool
}

// Agent ports inside every sandbox.
const (
	EnvdPort            = 49983
	CodeInterpreterPort = 49999
)
