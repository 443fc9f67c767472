//go:build linux

package microvm

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

// vmmPool keeps pre-started VMM processes (fork/exec, Go runtime start,
// /dev/kvm open and control socket done) and pre-copied disk overlays per
// template, so that a create only restores.
type vmmPool struct {
	r    *Runtime
	size int
	seq  atomic.Int64

	mu       sync.Mutex
	ready    []*pooled
	overlays map[string][]string // template -> ready overlay copies
	closed   bool
	kick     chan struct{}
	done     chan struct{}
}

type pooled struct {
	v   *vmm
	dir string
}

func newVMMPool(r *Runtime, size int) *vmmPool {
	p := &vmmPool{r: r, size: size, overlays: map[string][]string{}, kick: make(chan struct{}, 1), done: make(chan struct{})}
	go p.filler()
	p.refill()
	return p
}

func (p *vmmPool) refill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func (p *vmmPool) filler() {
	defer close(p.done)
	for range p.kick {
		for {
			p.mu.Lock()
			need := !p.closed && len(p.ready) < p.size
			p.mu.Unlock()
			if !need {
				break
			}
			e, err := p.start()
			if err != nil {
				p.r.log.Warn("microvm: pre-starting a VMM failed", "err", err)
				break
			}
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				p.r.stopVMM(e.v.pid, e.v.socket)
				os.RemoveAll(e.dir)
				return
			}
			p.ready = append(p.ready, e)
			p.mu.Unlock()
		}
	}
}

func (p *vmmPool) start() (*pooled, error) {
	dir := filepath.Join(p.r.o.Dir, "pool", fmt.Sprintf("%d-%d", os.Getpid(), p.seq.Add(1)))
	v, err := p.r.startVMM(dir)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	os.WriteFile(filepath.Join(dir, "pid"), []byte(strconv.Itoa(v.pid)), 0o644)
	return &pooled{v: v, dir: dir}, nil
}

// get hands out a pre-started VMM (or starts one) and moves its control
// socket and log into dst (a bound unix socket keeps working when its
// path is renamed).
func (p *vmmPool) get(dst string) (*vmm, error) {
	p.mu.Lock()
	var e *pooled
	if n := len(p.ready); n > 0 {
		e = p.ready[n-1]
		p.ready = p.ready[:n-1]
	}
	p.mu.Unlock()
	p.refill()
	if e == nil || !alive(e.v.pid) {
		var err error
		if e, err = p.start(); err != nil {
			return nil, err
		}
	}
	sock := filepath.Join(dst, "vmm.sock")
	if err := os.Rename(e.v.socket, sock); err != nil {
		e.v.kill()
		os.RemoveAll(e.dir)
		return nil, errs.Wrap(errs.Internal, err, "adopt pooled vmm")
	}
	os.Rename(filepath.Join(e.dir, "vmm.log"), filepath.Join(dst, "vmm.log"))
	os.RemoveAll(e.dir)
	v := *e.v
	v.socket = sock
	v.cl = newClient(sock)
	return &v, nil
}

// takeOverlay moves a pre-copied overlay of template tid to dst (or
// copies src now) and tops the pool up in the background.
func (p *vmmPool) takeOverlay(tid, src, dst string) error {
	p.mu.Lock()
	var ready string
	if l := p.overlays[tid]; len(l) > 0 {
		ready, p.overlays[tid] = l[len(l)-1], l[:len(l)-1]
	}
	p.mu.Unlock()
	if ready != "" && os.Rename(ready, dst) == nil {
		go p.fillOverlays(tid, src)
		return nil
	}
	if err := copySparse(src, dst); err != nil {
		return err
	}
	go p.fillOverlays(tid, src)
	return nil
}

func (p *vmmPool) fillOverlays(tid, src string) {
	dir := filepath.Join(p.r.o.Dir, "pool", "overlays-"+tid)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return
	}
	for {
		p.mu.Lock()
		n := len(p.overlays[tid])
		closed := p.closed
		p.mu.Unlock()
		if closed || n >= p.size {
			return
		}
		if _, err := os.Stat(src); err != nil {
			return
		}
		f := filepath.Join(dir, strconv.FormatInt(p.seq.Add(1), 10))
		if err := copySparse(src, f); err != nil {
			return
		}
		if _, err := os.Stat(f); err != nil {
			return // no overlay in the template: nothing to pool
		}
		p.mu.Lock()
		p.overlays[tid] = append(p.overlays[tid], f)
		p.mu.Unlock()
	}
}

func (p *vmmPool) dropOverlays(tid string) {
	p.mu.Lock()
	delete(p.overlays, tid)
	p.mu.Unlock()
	os.RemoveAll(filepath.Join(p.r.o.Dir, "pool", "overlays-"+tid))
}

func (p *vmmPool) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	ready := p.ready
	p.ready = nil
	p.overlays = map[string][]string{}
	close(p.kick)
	p.mu.Unlock()
	<-p.done
	for _, e := range ready {
		p.r.stopVMM(e.v.pid, e.v.socket)
		os.RemoveAll(e.dir)
	}
	ents, _ := os.ReadDir(filepath.Join(p.r.o.Dir, "pool"))
	for _, e := range ents {
		if len(e.Name()) > 9 && e.Name()[:9] == "overlays-" {
			os.RemoveAll(filepath.Join(p.r.o.Dir, "pool", e.Name()))
		}
	}
}

func newClient(sock string) *vmmapi.Client { return vmmapi.NewClient(sock) }
