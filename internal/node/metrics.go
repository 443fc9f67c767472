package node

import (
	"context"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// Metrics history (E2B getMetrics): every MetricsInterval the node samples
// each running sandbox (runtime.Stats: a few cgroup file reads on gVisor)
// into a bounded ring per sandbox holding MetricsRetention of samples.
// Paused sandboxes keep their history (no new samples); it is dropped when
// the sandbox stops being live. The history is in memory only: a restarted
// server starts it again.

// ring is a fixed-size circular buffer of samples, oldest first.
type ring struct {
	buf  []runtime.Stats
	next int
	full bool
}

func newRing(n int) *ring { return &ring{buf: make([]runtime.Stats, n)} }

func (r *ring) add(s runtime.Stats) {
	r.buf[r.next] = s
	r.next++
	if r.next == len(r.buf) {
		r.next, r.full = 0, true
	}
}

func (r *ring) len() int {
	if r.full {
		return len(r.buf)
	}
	return r.next
}

// at returns the i-th oldest sample.
func (r *ring) at(i int) runtime.Stats {
	if r.full {
		return r.buf[(r.next+i)%len(r.buf)]
	}
	return r.buf[i]
}

func (r *ring) last() (runtime.Stats, bool) {
	if r.len() == 0 {
		return runtime.Stats{}, false
	}
	return r.at(r.len() - 1), true
}

func (n *Node) ringSize() int {
	return max(1, int(n.cfg.MetricsRetention/n.cfg.MetricsInterval))
}

func (n *Node) record(id string, s runtime.Stats) {
	n.mmu.Lock()
	defer n.mmu.Unlock()
	r := n.history[id]
	if r == nil {
		r = newRing(n.ringSize())
		n.history[id] = r
	}
	// Keep the ring in time order even if an on-demand sample and a tick race.
	if l, ok := r.last(); ok && s.Timestamp.Before(l.Timestamp) {
		return
	}
	r.add(s)
}

// SampleNow samples every running sandbox once and forgets the history of
// sandboxes that are no longer live (the metrics loop calls it).
func (n *Node) SampleNow(ctx context.Context) {
	n.mu.Lock()
	var ids []string
	live := make(map[string]bool, len(n.cache))
	for id, sb := range n.cache {
		live[id] = true
		if sb.State == store.StateRunning {
			ids = append(ids, id)
		}
	}
	n.mu.Unlock()
	n.mmu.Lock()
	for id := range n.history {
		if !live[id] {
			delete(n.history, id)
		}
	}
	n.mmu.Unlock()
	for _, id := range ids {
		s, err := n.rt.Stats(ctx, id)
		if err != nil {
			continue // paused or killed meanwhile
		}
		n.record(id, s)
	}
}

func (n *Node) metricsLoop() {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.MetricsInterval)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			n.SampleNow(context.Background())
		}
	}
}

// Metrics returns the samples of the live sandbox id taken from start to
// end (inclusive, compared in whole seconds as the API speaks), oldest
// first. A running sandbox whose newest sample is older than half the
// interval is sampled now, so a fresh sandbox has at least one sample.
func (n *Node) Metrics(ctx context.Context, id string, start, end time.Time) ([]runtime.Stats, error) {
	sb, err := n.Get(id)
	if err != nil {
		return nil, err
	}
	if sb.State == store.StateRunning {
		n.mmu.Lock()
		l, ok := runtime.Stats{}, false
		if r := n.history[id]; r != nil {
			l, ok = r.last()
		}
		n.mmu.Unlock()
		if !ok || n.now().Sub(l.Timestamp) >= n.cfg.MetricsInterval/2 {
			s, err := n.rt.Stats(ctx, id)
			if err != nil && !errs.Is(err, errs.Conflict) && !errs.Is(err, errs.NotFound) {
				return nil, err
			}
			if err == nil {
				n.record(id, s)
			}
		}
	}
	n.mmu.Lock()
	defer n.mmu.Unlock()
	out := []runtime.Stats{}
	r := n.history[id]
	if r == nil {
		return out, nil
	}
	for i := 0; i < r.len(); i++ {
		s := r.at(i)
		if sec := s.Timestamp.Unix(); sec >= start.Unix() && sec <= end.Unix() {
			out = append(out, s)
		}
	}
	return out, nil
}
