package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/cubesandbox/cube/internal/store"
)

// Metrics are the server's Prometheus metrics, on their own registry.
type Metrics struct {
	Registry      *prometheus.Registry
	CreateLatency *prometheus.HistogramVec // seconds from POST to 201, by template
	CreateErrors  *prometheus.CounterVec   // failed creates, by error kind
	ProxyBytes    *prometheus.CounterVec   // proxied bytes, by direction (in = to the sandbox)
	ProxyRequests *prometheus.CounterVec   // proxied requests, by port class and outcome
	HTTPRequests  *prometheus.CounterVec   // API requests, by status code
}

// NewMetrics builds the metrics; counts reports live sandboxes per state
// for the cube_sandboxes gauge.
func NewMetrics(counts func() map[store.SandboxState]int) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		CreateLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cube_sandbox_create_seconds", Help: "Time from a create request to its 201 answer.",
			Buckets: []float64{.025, .05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 30},
		}, []string{"template"}),
		CreateErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cube_sandbox_create_errors_total", Help: "Failed sandbox creates by error kind.",
		}, []string{"kind"}),
		ProxyBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cube_proxy_bytes_total", Help: "Bytes relayed by the sandbox proxy (in = client to sandbox).",
		}, []string{"direction"}),
		ProxyRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cube_proxy_requests_total", Help: "Requests seen by the sandbox proxy.",
		}, []string{"outcome"}),
		HTTPRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cube_api_requests_total", Help: "API requests by status code.",
		}, []string{"code"}),
	}
	states := []store.SandboxState{store.StateCreating, store.StateRunning, store.StatePausing, store.StatePaused, store.StateResuming}
	desc := prometheus.NewDesc("cube_sandboxes", "Live sandboxes by state.", []string{"state"}, nil)
	m.Registry.MustRegister(m.CreateLatency, m.CreateErrors, m.ProxyBytes, m.ProxyRequests, m.HTTPRequests,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		gaugeFunc{desc: desc, collect: func(ch chan<- prometheus.Metric) {
			c := map[store.SandboxState]int{}
			if counts != nil {
				c = counts()
			}
			for _, s := range states {
				ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, float64(c[s]), string(s))
			}
		}})
	return m
}

type gaugeFunc struct {
	desc    *prometheus.Desc
	collect func(chan<- prometheus.Metric)
}

func (g gaugeFunc) Describe(ch chan<- *prometheus.Desc) { ch <- g.desc }
func (g gaugeFunc) Collect(ch chan<- prometheus.Metric) { g.collect(ch) }

type logCtx struct{}

var requestIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// WithRequestID gives every request an id (the client's X-Request-Id if it
// is sane, else a new one), sets it on the response, puts a logger with it
// in the context and logs the request when done.
func WithRequestID(log *slog.Logger, m *Metrics, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-Id")
		if !requestIDRE.MatchString(id) {
			b := make([]byte, 8)
			rand.Read(b)
			id = hex.EncodeToString(b)
		}
		w.Header().Set("X-Request-Id", id)
		l := log.With("request_id", id)
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		start := time.Now()
		next.ServeHTTP(sw, r.WithContext(contextWith(r, l)))
		if m != nil {
			m.HTTPRequests.WithLabelValues(strconv.Itoa(sw.status)).Inc()
		}
		level := slog.LevelDebug
		if sw.status >= 500 {
			level = slog.LevelWarn
		}
		l.Log(r.Context(), level, "request", "method", r.Method, "path", r.URL.Path, "status", sw.status,
			"duration_ms", time.Since(start).Milliseconds(), "sandbox", r.Header.Get("E2b-Sandbox-Id"))
	})
}

// statusWriter records the status; it forwards Flush, Hijack and the
// rest through Unwrap (http.ResponseController).
type statusWriter struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wrote {
		w.status, w.wrote = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.wrote = true
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func contextWith(r *http.Request, l *slog.Logger) context.Context {
	return context.WithValue(r.Context(), logCtx{}, l)
}

// Logger returns the request's logger (with its request id).
func Logger(r *http.Request, fallback *slog.Logger) *slog.Logger {
	if l, ok := r.Context().Value(logCtx{}).(*slog.Logger); ok {
		return l
	}
	return fallback
}
