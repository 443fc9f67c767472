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
//	POST /snapshot, POST /restore -> 501 (issue 7)
//
// Errors are {"error": {"kind": "...", "message": "..."}} with the HTTP
// status of the errs kind.

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

// Metrics are the VM's counters.
type Metrics struct {
	State         string            `json:"state"`
	UptimeSeconds float64           `json:"uptime_seconds"`
	Exits         map[string]uint64 `json:"exits"`
	PIOUnhandled  uint64            `json:"pio_unhandled"`
	MMIOUnhandled uint64            `json:"mmio_unhandled"`
	Pauses        uint64            `json:"pauses"`
	Notifies      uint64            `json:"ioeventfd_notifies"`
	VCPUs         int               `json:"vcpus"`
	MemBytes      uint64            `json:"mem_bytes"`
	RSSBytes      uint64            `json:"rss_bytes"`
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
