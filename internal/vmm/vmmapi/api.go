package vmmapi

// Control protocol: HTTP/1.1 + JSON on a unix socket.
//
//	GET  /status   -> Status
//	GET  /metrics  -> Metrics
//	POST /start    -> Status   (only with --no-start)
//	POST /pause    -> Status
//	POST /resume   -> Status
//	POST /stop     -> Status   (the process exits after replying)
//	GET  /debug/vcpus -> []VCPURegs (briefly pauses a running VM)
//	POST /snapshot {SnapshotRequest} -> SnapshotReply
//	POST /restore  {RestoreRequest}  -> RestoreReply (a pre-started VMM
//	                                    restores a snapshot and runs it)
//
// Errors are {"error": {"kind": "...", "message": "..."}} with the HTTP
// status of the errs kind.

import "github.com/cubesandbox/cube/internal/vmm/vm"

// Result says why the VM stopped.
type Result struct {
	Outcome string `json:"outcome"` // stopped | shutdown | halted | crashed
	Reason  string `json:"reason"`
	VCPU    int    `json:"vcpu"`
	RIP     uint64 `json:"rip"`
}

// Status is the VMM's state.
type Status struct {
	State   string  `json:"state"` // created | running | paused | stopped
	PID     int     `json:"pid"`
	Cmdline string  `json:"cmdline"`
	Uptime  float64 `json:"uptime_seconds"`
	Result  *Result `json:"result,omitempty"`
}

// Metrics are the VM's counters (vm.Snapshot's fields, flattened in
// JSON) and the VMM process's resident memory.
type Metrics struct {
	vm.Snapshot
	RSSBytes uint64 `json:"rss_bytes"`
}

// VCPURegs is a debugging view of one vCPU (GET /debug/vcpus).
type VCPURegs struct {
	ID      int    `json:"id"`
	RIP     uint64 `json:"rip"`
	RSP     uint64 `json:"rsp"`
	RFLAGS  uint64 `json:"rflags"`
	CR0     uint64 `json:"cr0"`
	CR3     uint64 `json:"cr3"`
	CR4     uint64 `json:"cr4"`
	EFER    uint64 `json:"efer"`
	CS      uint16 `json:"cs"`
	MPState uint32 `json:"mp_state"`
}

// ErrorBody is the error envelope.
type ErrorBody struct {
	Error struct {
		Kind    string `json:"kind"`
		Message string `json:"message"`
	} `json:"error"`
}

// SnapshotRequest asks for a snapshot of the running VM into Dir.
type SnapshotRequest struct {
	Dir string `json:"dir"`
	// Resume lets the VM run on afterwards (fork); otherwise it stays
	// paused (pause).
	Resume bool `json:"resume,omitempty"`
	// Diff writes only the memory changed since the VM was restored, as
	// a layer over the snapshot it was restored from (Dir must be that
	// snapshot's directory or a new one; see docs/snapshot.md).
	Diff bool `json:"diff,omitempty"`
}

// SnapshotReply describes a written snapshot.
type SnapshotReply struct {
	Dir         string  `json:"dir"`
	MemBytes    uint64  `json:"mem_bytes"`     // guest RAM size
	WrittenMem  uint64  `json:"written_bytes"` // memory bytes written
	PauseMillis float64 `json:"pause_ms"`      // time the vCPUs were stopped
	Status      Status  `json:"status"`
}

// RestoreRequest asks a pre-started VMM to restore the snapshot in Dir.
type RestoreRequest struct {
	Dir string `json:"dir"`
	// WaitWord, if set, is a guest-physical address of a 64-bit word the
	// guest changes while it runs; the reply waits until it changed
	// (synthetic guests: proof the vCPUs are really running).
	WaitWord uint64 `json:"wait_word,omitempty"`
	// Paused restores without starting the vCPUs.
	Paused bool `json:"paused,omitempty"`
	// Options, if set, are this restore's device back-ends (disk
	// overlay, tap, vsock socket); they must describe the same device set
	// as the snapshot. Without them the VMM uses its own (prepared) set.
	Options *Options `json:"options,omitempty"`
	// TapNetns is the network namespace (path) the tap named in
	// Options.TapName lives in.
	TapNetns string `json:"tap_netns,omitempty"`
}

// RestoreReply reports a restore.
type RestoreReply struct {
	Status        Status  `json:"status"`
	RestoreMillis float64 `json:"restore_ms"` // load + map + set state + start
}
