//go:build linux

package envd

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
)

// InitRequest is the body of POST /init: how the node configures the
// agent at boot and after every snapshot restore.
type InitRequest struct {
	AccessToken    *string           `json:"accessToken,omitempty"`
	EnvVars        map[string]string `json:"envVars,omitempty"`
	DefaultUser    string            `json:"defaultUser,omitempty"`
	DefaultWorkdir *string           `json:"defaultWorkdir,omitempty"`
	// Timestamp (RFC 3339) is the host's time: the clock is stepped to it
	// when the agent manages the clock (a restored VM's clock is stale).
	Timestamp string `json:"timestamp,omitempty"`
	// Entropy (base64, up to 4 KiB) is mixed into the kernel RNG, which is
	// then reseeded: clones of one snapshot must not share random state.
	Entropy string `json:"entropy,omitempty"`
}

const maxInitBody = 1 << 20

func (s *Server) handleInit(w http.ResponseWriter, r *http.Request) {
	// Once a token is set, re-initialisation must present it.
	if tok := s.currentToken(); tok != "" && !tokenOK(r.Header.Get("X-Access-Token"), tok) {
		writeJSONError(w, errs.E(errs.Unauthenticated, "invalid or missing access token"))
		return
	}
	var req InitRequest
	body, err := io.ReadAll(io.LimitReader(r.Body, maxInitBody+1))
	if err != nil || len(body) > maxInitBody {
		writeJSONError(w, errs.E(errs.InvalidArgument, "init body unreadable or too large"))
		return
	}
	if len(strings.TrimSpace(string(body))) > 0 {
		if err := json.Unmarshal(body, &req); err != nil {
			writeJSONError(w, errs.Wrap(errs.InvalidArgument, err, "malformed init body"))
			return
		}
	}
	if err := s.Init(req); err != nil {
		writeJSONError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// Init applies an InitRequest.
func (s *Server) Init(req InitRequest) error {
	var entropy []byte
	if req.Entropy != "" {
		b, err := base64.StdEncoding.DecodeString(req.Entropy)
		if err != nil || len(b) > 4096 {
			return errs.E(errs.InvalidArgument, "entropy must be base64 of at most 4096 bytes")
		}
		entropy = b
	}
	var ts time.Time
	if req.Timestamp != "" {
		t, err := time.Parse(time.RFC3339Nano, req.Timestamp)
		if err != nil {
			return errs.E(errs.InvalidArgument, "timestamp must be RFC 3339")
		}
		ts = t
	}
	if req.DefaultUser != "" {
		if _, err := LookupUser(req.DefaultUser); err != nil {
			return errs.E(errs.InvalidArgument, "default user %q does not exist", req.DefaultUser)
		}
	}
	// The start command rides in envVars (StartCmdEnv) but is no env var
	// of the sandbox's processes. Only an agent that has none yet reads it:
	// a restored agent already runs the one from its snapshot.
	var startArgv []string
	if v, ok := req.EnvVars[StartCmdEnv]; ok {
		req.EnvVars = maps.Clone(req.EnvVars)
		delete(req.EnvVars, StartCmdEnv)
		if s.startState() == StartNone {
			argv, err := ParseStartCmd(v)
			if err != nil {
				return err
			}
			startArgv = argv
		}
	}
	if len(entropy) > 0 {
		if err := AddEntropy(entropy); err != nil {
			return err
		}
	}
	s.mu.Lock()
	manage := s.manageClock
	if req.AccessToken != nil {
		s.token = *req.AccessToken
	}
	if req.EnvVars != nil {
		maps.Copy(s.envs, req.EnvVars)
	}
	if req.DefaultUser != "" {
		s.defaultUser = req.DefaultUser
	}
	if req.DefaultWorkdir != nil {
		s.workdir = *req.DefaultWorkdir
	}
	s.mu.Unlock()
	if manage && !ts.IsZero() {
		if d := time.Since(ts); d > 50*time.Millisecond || d < -50*time.Millisecond {
			tv := unix.NsecToTimeval(ts.UnixNano())
			if err := unix.Settimeofday(&tv); err != nil {
				s.log.Warn("init: cannot step clock", "err", err)
			}
		}
	}
	if startArgv != nil {
		// After the env and workdir above: the command gets them. A
		// command that cannot start is reported by GET /start, not here.
		_ = s.StartCommand(startArgv, nil, "")
	}
	return nil
}

// AddEntropy credits b to the kernel entropy pool (RNDADDENTROPY) and
// reseeds the CRNG (RNDRESEEDCRNG), so that a restored snapshot's random
// state diverges from its siblings'.
func AddEntropy(b []byte) error {
	f, err := os.OpenFile("/dev/random", os.O_WRONLY, 0)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "open /dev/random")
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(b)+3)
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(b) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(b))
	copy(buf[8:], b)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		// Without CAP_SYS_ADMIN, still mix the bytes in (uncredited).
		if _, werr := f.Write(b); werr != nil {
			return errs.Wrap(errs.Internal, e, "add entropy")
		}
		runtime.KeepAlive(buf)
		return nil
	}
	runtime.KeepAlive(buf)
	_, _, _ = unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0)
	return nil
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	m := map[string]any{"ts": time.Now().Unix(), "cpu_count": runtime.NumCPU()}
	m["cpu_used_pct"] = cpuUsedPct()
	mem := readMeminfo()
	total, avail := mem["MemTotal"], mem["MemAvailable"]
	cache := mem["Cached"] + mem["Buffers"]
	m["mem_total"] = total
	m["mem_used"] = total - avail
	m["mem_cache"] = cache
	m["mem_total_mib"] = total >> 20
	m["mem_used_mib"] = (total - avail) >> 20
	var st unix.Statfs_t
	if unix.Statfs("/", &st) == nil {
		m["disk_total"] = st.Blocks * uint64(st.Bsize)
		m["disk_used"] = (st.Blocks - st.Bfree) * uint64(st.Bsize)
	}
	writeJSON(w, http.StatusOK, m)
}

func readMeminfo() map[string]uint64 {
	out := map[string]uint64{}
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 0 {
			continue
		}
		n, _ := strconv.ParseUint(fields[0], 10, 64)
		out[k] = n * 1024
	}
	return out
}

func cpuSample() (idle, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		n, _ := strconv.ParseUint(v, 10, 64)
		total += n
		if i == 3 || i == 4 {
			idle += n
		}
	}
	return idle, total
}

func cpuUsedPct() float64 {
	i1, t1 := cpuSample()
	time.Sleep(100 * time.Millisecond)
	i2, t2 := cpuSample()
	if t2 <= t1 {
		return 0
	}
	return float64((t2-t1)-(i2-i1)) / float64(t2-t1) * 100
}
