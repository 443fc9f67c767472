package vmmapi

// Control protocol: HTTP/1.1 + JSON on a unix socket.
//
//	GET  /status   -> Status
//	GET  /metrics  -> Metrics
//	POST /start    -> Status   (only with --no-start)
//	POST /pause    -> Status
//	POST /resume   -> Status
//	POST /stop     -> Status   (the process exits after replying)
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

// ErrorBody is the error envelope.
type ErrorBody struct {
	Error struct {
		Kind    string `json:"kind"`
		Message string `json:"message"`
	} `json:"error"`
}
