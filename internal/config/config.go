// Package config is Cube's one typed configuration. Defaults live in the
// `default` struct tags; a JSON file (optional) and CUBE_* environment
// variables (the `env` tags) override them, in that order; command-line
// flags bound by cmd/cube override last.
package config

import (
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// Config is the whole configuration of a cube process.
type Config struct {
	DataDir   string `json:"dataDir" env:"CUBE_DATA_DIR" default:"/var/lib/cube"`
	CacheDir  string `json:"cacheDir" env:"CUBE_CACHE_DIR" default:"/var/cache/cube"`
	LogLevel  string `json:"logLevel" env:"CUBE_LOG_LEVEL" default:"info"`
	LogFormat string `json:"logFormat" env:"CUBE_LOG_FORMAT" default:"text"`

	// Server (API + proxy) settings.
	Listen        string `json:"listen" env:"CUBE_LISTEN" default:":3000"`
	ClusterListen string `json:"clusterListen" env:"CUBE_CLUSTER_LISTEN" default:":3001"`
	Domain        string `json:"domain" env:"CUBE_DOMAIN" default:""`
	TLSCert       string `json:"tlsCert" env:"CUBE_TLS_CERT" default:""`
	TLSKey        string `json:"tlsKey" env:"CUBE_TLS_KEY" default:""`
	// DatabaseURL selects the store: empty = SQLite in DataDir;
	// postgres://... = PostgreSQL.
	DatabaseURL string `json:"databaseURL" env:"CUBE_DATABASE_URL" default:""`
	// UIDir mounts a web UI at /ui/ from this directory; empty = the
	// embedded dashboard (internal/ui).
	UIDir string `json:"uiDir" env:"CUBE_UI_DIR" default:""`

	// Cluster settings (docs/cluster.md). Role of `cube server`: all
	// (API + proxy + scheduler + a local node) | control (no local node;
	// nodes join with `cube node --join`).
	Role string `json:"role" env:"CUBE_ROLE" default:"all"`
	// ClusterToken is the shared secret of the control and its nodes.
	ClusterToken string `json:"clusterToken" env:"CUBE_CLUSTER_TOKEN" default:""`
	// HeartbeatInterval is how often nodes report to the control.
	HeartbeatInterval time.Duration `json:"heartbeatInterval" env:"CUBE_HEARTBEAT_INTERVAL" default:"2s"`
	// NodeDownAfter is the silence after which the control marks a node down.
	NodeDownAfter time.Duration `json:"nodeDownAfter" env:"CUBE_NODE_DOWN_AFTER" default:"6s"`
	// BuiltinTemplates limits the built-in templates prepared at start
	// (comma-separated names; empty = all).
	BuiltinTemplates string `json:"builtinTemplates" env:"CUBE_BUILTIN_TEMPLATES" default:""`

	// Node settings.
	Runtime        string        `json:"runtime" env:"CUBE_RUNTIME" default:"auto"` // auto | microvm | gvisor
	MaxSandboxes   int           `json:"maxSandboxes" env:"CUBE_MAX_SANDBOXES" default:"64"`
	WarmPoolSize   int           `json:"warmPoolSize" env:"CUBE_WARM_POOL_SIZE" default:"2"`
	SlotPoolSize   int           `json:"slotPoolSize" env:"CUBE_SLOT_POOL_SIZE" default:"4"`
	SlotHostRange  string        `json:"slotHostRange" env:"CUBE_SLOT_HOST_RANGE" default:"10.213.0.0/16"`
	DefaultTimeout time.Duration `json:"defaultTimeout" env:"CUBE_DEFAULT_TIMEOUT" default:"300s"`
	RunscPath      string        `json:"runscPath" env:"CUBE_RUNSC" default:""`
	AgentPath      string        `json:"agentPath" env:"CUBE_AGENT" default:""`
	KernelPath     string        `json:"kernelPath" env:"CUBE_KERNEL" default:""`
	DebianMirror   string        `json:"debianMirror" env:"CUBE_DEBIAN_MIRROR" default:""`
	// MetricsInterval is how often each running sandbox is sampled for
	// GET /sandboxes/{id}/metrics; MetricsRetention how much history is
	// kept per sandbox (in memory, a ring of Retention/Interval samples).
	MetricsInterval  time.Duration `json:"metricsInterval" env:"CUBE_METRICS_INTERVAL" default:"5s"`
	MetricsRetention time.Duration `json:"metricsRetention" env:"CUBE_METRICS_RETENTION" default:"1h"`

	// VMMJail runs each microVM's VMM jailed (namespaces, cgroup, fds;
	// docs/vmm.md); VMMSeccomp installs its seccomp filter. Turn them off
	// only to debug. VMMUID/VMMGID > 0 run jailed VMMs as that user
	// (then without network slots: opening a slot's tap in its netns
	// needs CAP_SYS_ADMIN; templates and snapshot dirs must be its).
	VMMJail    bool `json:"vmmJail" env:"CUBE_VMM_JAIL" default:"true"`
	VMMSeccomp bool `json:"vmmSeccomp" env:"CUBE_VMM_SECCOMP" default:"true"`
	VMMUID     int  `json:"vmmUID" env:"CUBE_VMM_UID" default:"0"`
	VMMGID     int  `json:"vmmGID" env:"CUBE_VMM_GID" default:"0"`

	// Network slots (internal/network; SlotHostRange and SlotPoolSize above).
	// SlotPrefix names every namespace and link it creates (<prefix>r<N>,
	// <prefix>g<N>, <prefix>h<N>); stale ones are removed at startup.
	SlotPrefix string `json:"slotPrefix" env:"CUBE_SLOT_PREFIX" default:"cube"`
	// SlotMode is the guest side of slots: auto (from the runtime) | tap | netns.
	SlotMode string `json:"slotMode" env:"CUBE_SLOT_MODE" default:"auto"`
	// SlotConnRate limits new outbound connections per second per sandbox (0 = no limit).
	SlotConnRate int `json:"slotConnRate" env:"CUBE_SLOT_CONN_RATE" default:"200"`
	// SlotMaxConns limits concurrent outbound connections per sandbox (0 = no limit).
	SlotMaxConns int `json:"slotMaxConns" env:"CUBE_SLOT_MAX_CONNS" default:"4096"`
	// SlotDNSUpstream is the resolver the per-slot DNS forwarders ask
	// (host:port; empty = first nameserver of /etc/resolv.conf).
	SlotDNSUpstream string `json:"slotDNSUpstream" env:"CUBE_SLOT_DNS_UPSTREAM" default:""`
}

// Default returns a Config with every default applied.
func Default() Config {
	var c Config
	if err := applyTags(&c, func(f reflect.StructField) (string, bool) {
		v, ok := f.Tag.Lookup("default")
		return v, ok
	}); err != nil {
		panic(err) // defaults are constants: a bad one is a bug
	}
	return c
}

// Load returns the defaults, overridden by the JSON file at path (if path
// is non-empty) and then by CUBE_* environment variables.
func Load(path string) (Config, error) {
	c := Default()
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return c, errs.Wrap(errs.InvalidArgument, err, "read config file %s", path)
		}
		dec := json.NewDecoder(strings.NewReader(string(b)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			return c, errs.Wrap(errs.InvalidArgument, err, "parse config file %s", path)
		}
	}
	err := applyTags(&c, func(f reflect.StructField) (string, bool) {
		name := f.Tag.Get("env")
		if name == "" {
			return "", false
		}
		return os.LookupEnv(name)
	})
	return c, err
}

func applyTags(c *Config, get func(reflect.StructField) (string, bool)) error {
	v := reflect.ValueOf(c).Elem()
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		s, ok := get(f)
		if !ok {
			continue
		}
		fv := v.Field(i)
		switch fv.Interface().(type) {
		case string:
			fv.SetString(s)
		case int:
			n, err := strconv.Atoi(s)
			if err != nil {
				return errs.E(errs.InvalidArgument, "config %s: %q is not a whole number", f.Name, s)
			}
			fv.SetInt(int64(n))
		case time.Duration:
			d, err := time.ParseDuration(s)
			if err != nil {
				return errs.E(errs.InvalidArgument, "config %s: %q is not a duration", f.Name, s)
			}
			fv.SetInt(int64(d))
		case bool:
			b, err := strconv.ParseBool(s)
			if err != nil {
				return errs.E(errs.InvalidArgument, "config %s: %q is not a boolean", f.Name, s)
			}
			fv.SetBool(b)
		default:
			return fmt.Errorf("config: unsupported field type %s", fv.Type())
		}
	}
	return nil
}
