package api

import (
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/store"
)

// Wire types of the E2B REST API (see /work/shared/spec/e2b-compat.md §3).

// AutoResume is E2B's `autoResume` object.
type AutoResume struct {
	Enabled bool `json:"enabled"`
}

// NetworkConfig is E2B's `network` object on create.
type NetworkConfig struct {
	AllowOut           []string        `json:"allowOut,omitempty"`
	DenyOut            []string        `json:"denyOut,omitempty"`
	AllowPublicTraffic *bool           `json:"allowPublicTraffic,omitempty"`
	MaskRequestHost    string          `json:"maskRequestHost,omitempty"`
	EgressProxy        json.RawMessage `json:"egressProxy,omitempty"`
	Rules              json.RawMessage `json:"rules,omitempty"`
	HTTPSPorts         []int           `json:"httpsPorts,omitempty"`
}

// NewSandbox is the body of POST /sandboxes and POST /v2/sandboxes.
type NewSandbox struct {
	TemplateID          string            `json:"templateID"`
	Timeout             *int64            `json:"timeout,omitempty"`
	Metadata            map[string]string `json:"metadata,omitempty"`
	EnvVars             map[string]string `json:"envVars,omitempty"`
	Secure              *bool             `json:"secure,omitempty"`
	AllowInternetAccess *bool             `json:"allow_internet_access,omitempty"`
	AutoPause           *bool             `json:"autoPause,omitempty"`
	AutoPauseMemory     *bool             `json:"autoPauseMemory,omitempty"`
	AutoResume          *AutoResume       `json:"autoResume,omitempty"`
	Network             *NetworkConfig    `json:"network,omitempty"`
	MCP                 json.RawMessage   `json:"mcp,omitempty"`
	IAM                 json.RawMessage   `json:"iam,omitempty"`
	VolumeMounts        json.RawMessage   `json:"volumeMounts,omitempty"`
}

// Sandbox is the answer to create, connect and resume.
type Sandbox struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	Alias              string  `json:"alias,omitempty"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken,omitempty"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

// ListedSandbox is one entry of GET /v2/sandboxes and GET /sandboxes.
type ListedSandbox struct {
	TemplateID   string            `json:"templateID"`
	Alias        string            `json:"alias,omitempty"`
	SandboxID    string            `json:"sandboxID"`
	ClientID     string            `json:"clientID"`
	StartedAt    time.Time         `json:"startedAt"`
	EndAt        time.Time         `json:"endAt"`
	CPUCount     int               `json:"cpuCount"`
	MemoryMB     int               `json:"memoryMB"`
	DiskSizeMB   int               `json:"diskSizeMB"`
	State        string            `json:"state"`
	EnvdVersion  string            `json:"envdVersion"`
	Metadata     map[string]string `json:"metadata,omitempty"`
	VolumeMounts []any             `json:"volumeMounts"`
}

// Lifecycle is SandboxDetail.lifecycle.
type Lifecycle struct {
	OnTimeout  string `json:"onTimeout"`
	AutoResume bool   `json:"autoResume"`
}

// SandboxDetail is the answer to GET /sandboxes/{id}.
type SandboxDetail struct {
	ListedSandbox
	EnvdAccessToken     string         `json:"envdAccessToken,omitempty"`
	Domain              *string        `json:"domain"`
	AllowInternetAccess *bool          `json:"allowInternetAccess"`
	Network             *store.Network `json:"network,omitempty"`
	Lifecycle           Lifecycle      `json:"lifecycle"`
}

// SandboxMetric is one usage sample.
type SandboxMetric struct {
	Timestamp     time.Time `json:"timestamp"`
	TimestampUnix int64     `json:"timestampUnix"`
	CPUCount      int       `json:"cpuCount"`
	CPUUsedPct    float64   `json:"cpuUsedPct"`
	MemUsed       int64     `json:"memUsed"`
	MemTotal      int64     `json:"memTotal"`
	MemCache      int64     `json:"memCache"`
	DiskUsed      int64     `json:"diskUsed"`
	DiskTotal     int64     `json:"diskTotal"`
}

// SandboxLog is a v1 log line.
type SandboxLog struct {
	Timestamp time.Time `json:"timestamp"`
	Line      string    `json:"line"`
}

// SandboxLogEntry is a structured log entry (v1 logEntries, v2 logs).
type SandboxLogEntry struct {
	Timestamp time.Time         `json:"timestamp"`
	Level     string            `json:"level"`
	Message   string            `json:"message"`
	Fields    map[string]string `json:"fields"`
}

// Template is one entry of GET /templates.
type Template struct {
	TemplateID    string     `json:"templateID"`
	BuildID       string     `json:"buildID"`
	CPUCount      int        `json:"cpuCount"`
	MemoryMB      int        `json:"memoryMB"`
	DiskSizeMB    int        `json:"diskSizeMB"`
	Public        bool       `json:"public"`
	Aliases       []string   `json:"aliases"`
	CreatedAt     time.Time  `json:"createdAt"`
	UpdatedAt     time.Time  `json:"updatedAt"`
	CreatedBy     *string    `json:"createdBy"`
	LastSpawnedAt *time.Time `json:"lastSpawnedAt"`
	SpawnCount    int64      `json:"spawnCount"`
	BuildCount    int        `json:"buildCount"`
	EnvdVersion   string     `json:"envdVersion"`
	BuildStatus   string     `json:"buildStatus"`
}

// Limits on what a client may send.
const (
	MaxBodyBytes      = 1 << 20
	MaxMetadataKeys   = 100
	MaxMetadataBytes  = 32 << 10
	MaxKeyLen         = 256
	MaxValueLen       = 4096
	MaxEnvVars        = 500
	MaxEnvBytes       = 256 << 10
	MaxTimeoutSeconds = 24 * 3600
	MaxNetworkEntries = 500
)

var (
	templateRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$`)
	envNameRE  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	hostRE     = regexp.MustCompile(`^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$`)
)

// ValidateNewSandbox checks a create request; the error is InvalidArgument
// with a message that names the field.
func ValidateNewSandbox(r *NewSandbox) error {
	if r.TemplateID == "" {
		return errs.E(errs.InvalidArgument, "templateID is required")
	}
	if !templateRE.MatchString(r.TemplateID) {
		return errs.E(errs.InvalidArgument, "templateID %q is not a valid template name", truncate(r.TemplateID, 64))
	}
	if r.Timeout != nil {
		if err := checkTimeout("timeout", *r.Timeout); err != nil {
			return err
		}
	}
	if err := checkMap("metadata", r.Metadata, MaxMetadataKeys, MaxMetadataBytes, nil); err != nil {
		return err
	}
	if err := checkMap("envVars", r.EnvVars, MaxEnvVars, MaxEnvBytes, envNameRE); err != nil {
		return err
	}
	if r.Network != nil {
		if err := checkEgress(r.Network.AllowOut, r.Network.DenyOut); err != nil {
			return err
		}
	}
	if len(r.VolumeMounts) > 0 && string(r.VolumeMounts) != "null" && string(r.VolumeMounts) != "[]" {
		return errs.E(errs.InvalidArgument, "volumeMounts are not supported")
	}
	return nil
}

func checkTimeout(field string, v int64) error {
	if v < 0 {
		return errs.E(errs.InvalidArgument, "%s must not be negative", field)
	}
	if v > MaxTimeoutSeconds {
		return errs.E(errs.InvalidArgument, "%s must be at most %d seconds", field, MaxTimeoutSeconds)
	}
	return nil
}

func checkMap(field string, m map[string]string, maxKeys, maxBytes int, keyRE *regexp.Regexp) error {
	if len(m) > maxKeys {
		return errs.E(errs.InvalidArgument, "%s has %d entries, at most %d allowed", field, len(m), maxKeys)
	}
	total := 0
	for k, v := range m {
		if k == "" || len(k) > MaxKeyLen {
			return errs.E(errs.InvalidArgument, "%s keys must be 1 to %d bytes", field, MaxKeyLen)
		}
		if keyRE != nil && !keyRE.MatchString(k) {
			return errs.E(errs.InvalidArgument, "%s key %q is not a valid name", field, truncate(k, 64))
		}
		if field == "metadata" && len(v) > MaxValueLen {
			return errs.E(errs.InvalidArgument, "%s value of %q is longer than %d bytes", field, truncate(k, 64), MaxValueLen)
		}
		total += len(k) + len(v)
	}
	if total > maxBytes {
		return errs.E(errs.InvalidArgument, "%s is %d bytes, at most %d allowed", field, total, maxBytes)
	}
	return nil
}

func checkEgress(lists ...[]string) error {
	n := 0
	for _, l := range lists {
		n += len(l)
		for _, e := range l {
			if !validEgress(e) {
				return errs.E(errs.InvalidArgument, "network rule %q is not an IP address, CIDR or domain", truncate(e, 64))
			}
		}
	}
	if n > MaxNetworkEntries {
		return errs.E(errs.InvalidArgument, "at most %d network rules allowed", MaxNetworkEntries)
	}
	return nil
}

func validEgress(e string) bool {
	if net.ParseIP(e) != nil {
		return true
	}
	if _, _, err := net.ParseCIDR(e); err == nil {
		return true
	}
	return len(e) <= 253 && hostRE.MatchString(e)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// publicState maps a lifecycle state to the two the SDKs know.
func publicState(s store.SandboxState) string {
	switch s {
	case store.StatePaused, store.StatePausing:
		return "paused"
	}
	return "running"
}

// parseStates parses the `state` query values (comma-separated and/or
// repeated) into store states.
func parseStates(vals []string) ([]store.SandboxState, error) {
	var out []store.SandboxState
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			switch strings.TrimSpace(s) {
			case "running":
				out = append(out, store.StateRunning, store.StateCreating, store.StateResuming)
			case "paused":
				out = append(out, store.StatePaused, store.StatePausing)
			case "":
			default:
				return nil, errs.E(errs.InvalidArgument, "state %q: want running or paused", truncate(s, 32))
			}
		}
	}
	return out, nil
}

func secondsFromDuration(d time.Duration) string {
	return fmt.Sprint(int64((d + time.Second - 1) / time.Second))
}
