//go:build linux

package gvisor

import (
	"context"
	"github.com/cubesandbox/cube/internal/runtime"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// pool keeps up to size restored, idle sandboxes per template, each in its
// own network namespace with the template's default limits. A create takes
// one (then only its id, limits and labels change) and the pool refills in
// the background, one restore at a time.
type pool struct {
	r    *Runtime
	size int

	mu      sync.Mutex
	ready   map[string][]sandboxMeta // template -> idle sandboxes
	wanted  map[string]bool
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	stopped bool
}

func newPool(r *Runtime, size int) *pool {
	p := &pool{r: r, size: size, ready: map[string][]sandboxMeta{}, wanted: map[string]bool{},
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.loop()
	return p
}

func (p *pool) dir(cid string) string { return filepath.Join(p.r.dir, "pool", cid) }

// want asks for template tid's pool to be (re)filled.
func (p *pool) want(tid string) {
	if p.size <= 0 {
		return
	}
	p.mu.Lock()
	p.wanted[tid] = true
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// take hands out an idle sandbox of template tid.
func (p *pool) take(tid string) (sandboxMeta, string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	l := p.ready[tid]
	if len(l) == 0 {
		return sandboxMeta{}, "", false
	}
	m := l[0]
	p.ready[tid] = l[1:]
	return m, p.dir(m.CID), true
}

// drop destroys template tid's idle sandboxes and stops refilling it.
func (p *pool) drop(tid string) {
	p.mu.Lock()
	l := p.ready[tid]
	delete(p.ready, tid)
	delete(p.wanted, tid)
	p.mu.Unlock()
	for _, m := range l {
		p.destroy(m)
	}
}

func (p *pool) destroy(m sandboxMeta) {
	p.r.destroyMeta(context.Background(), &m)
	os.RemoveAll(p.dir(m.CID))
}

// Size reports how many idle sandboxes template tid has.
func (p *pool) count(tid string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready[tid])
}

func (p *pool) loop() {
	defer close(p.done)
	for {
		select {
		case <-p.stop:
			return
		case <-p.kick:
		}
		for p.fillOne() {
			select {
			case <-p.stop:
				return
			default:
			}
		}
	}
}

// fillOne restores one sandbox for a template that is short; it reports
// whether there may be more to do.
func (p *pool) fillOne() bool {
	p.mu.Lock()
	tid := ""
	for t := range p.wanted {
		if len(p.ready[t]) < p.size {
			tid = t
			break
		}
		delete(p.wanted, t)
	}
	p.mu.Unlock()
	if tid == "" {
		return false
	}
	tm, err := p.r.loadTemplate(tid)
	if err != nil {
		p.mu.Lock()
		delete(p.wanted, tid)
		p.mu.Unlock()
		return true
	}
	cid := p.r.newCID()
	d := p.dir(cid)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m, err := p.r.restore(ctx, d, tm.source, cid, zeroNet, tm.Resources)
	if err != nil {
		os.RemoveAll(d)
		p.r.log.Warn("warm pool: restore failed", "template", tid, "err", err)
		p.mu.Lock()
		delete(p.wanted, tid)
		p.mu.Unlock()
		return true
	}
	writeJSON(filepath.Join(d, "meta.json"), m)
	p.mu.Lock()
	_, stillWanted := p.wanted[tid]
	if p.stopped || !stillWanted {
		p.mu.Unlock()
		p.destroy(m)
		return true
	}
	p.ready[tid] = append(p.ready[tid], m)
	p.mu.Unlock()
	return true
}

// close stops refilling and destroys every idle sandbox.
func (p *pool) close() {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return
	}
	p.stopped = true
	p.mu.Unlock()
	close(p.stop)
	<-p.done
	p.mu.Lock()
	all := p.ready
	p.ready = map[string][]sandboxMeta{}
	p.mu.Unlock()
	for _, l := range all {
		for _, m := range l {
			p.destroy(m)
		}
	}
}

var zeroNet runtime.NetSlot

// PoolReady reports how many warm sandboxes template tid has ready.
func (r *Runtime) PoolReady(tid string) int { return r.pool.count(tid) }
