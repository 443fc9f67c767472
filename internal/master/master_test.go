package master_test

import (
	"context"
	"testing"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/store"
)

// fakeNode is a master.Node for scheduling logic: it only counts creates.
type fakeNode struct {
	master.Node // nil: only the methods below are called
	id          string
	capa, used  int
	down        bool
	full        bool // refuse creates as if it filled meanwhile
	created     []string
	templates   map[string]bool // nil: every template
}

type fakeTplNode struct{ *fakeNode }

func (f fakeTplNode) HasTemplate(id string) bool { return f.templates[id] }

func (f *fakeNode) ID() string    { return f.id }
func (f *fakeNode) Free() int     { return f.capa - f.used }
func (f *fakeNode) Capacity() int { return f.capa }
func (f *fakeNode) Up() bool      { return !f.down }
func (f *fakeNode) Create(ctx context.Context, req node.CreateRequest) (*store.Sandbox, error) {
	if f.full {
		return nil, errs.E(errs.ResourceExhausted, "full")
	}
	f.used++
	f.created = append(f.created, req.ID)
	return &store.Sandbox{ID: req.ID, NodeID: f.id}, nil
}

func ids(ns []master.Node) []string {
	var out []string
	for _, n := range ns {
		out = append(out, n.ID())
	}
	return out
}

func TestRank(t *testing.T) {
	for _, c := range []struct {
		name  string
		nodes []*fakeNode
		want  []string
	}{
		{"least used share first", []*fakeNode{{id: "a", capa: 10, used: 5}, {id: "b", capa: 4, used: 1}, {id: "c", capa: 100, used: 90}}, []string{"b", "a", "c"}},
		{"same share: more free first", []*fakeNode{{id: "a", capa: 4, used: 2}, {id: "b", capa: 8, used: 4}}, []string{"b", "a"}},
		{"tie: by id", []*fakeNode{{id: "b", capa: 4}, {id: "a", capa: 4}}, []string{"a", "b"}},
		{"full, down and zero-capacity nodes are left out", []*fakeNode{{id: "a", capa: 4, used: 4}, {id: "b", capa: 4, down: true},
			{id: "c"}, {id: "d", capa: 2, used: 1}}, []string{"d"}},
		{"none", nil, nil},
	} {
		var ns []master.Node
		for _, n := range c.nodes {
			ns = append(ns, n)
		}
		got := ids(master.Rank(ns))
		if len(got) != len(c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: %v, want %v", c.name, got, c.want)
				break
			}
		}
	}
}

func TestCreateSpreads(t *testing.T) {
	a, b := &fakeNode{id: "a", capa: 4}, &fakeNode{id: "b", capa: 2}
	m := master.New(nil, a, b)
	for i := 0; i < 6; i++ {
		if _, err := m.Create(context.Background(), node.CreateRequest{ID: string(rune('0' + i))}); err != nil {
			t.Fatal(i, err)
		}
	}
	if a.used != 4 || b.used != 2 {
		t.Fatalf("a %d b %d", a.used, b.used)
	}
	_, err := m.Create(context.Background(), node.CreateRequest{ID: "x"})
	if !errs.Is(err, errs.ResourceExhausted) || errs.RetryAfterOf(err) == 0 {
		t.Fatalf("all full: %v", err)
	}
}

func TestCreateFallsThrough(t *testing.T) {
	a, b := &fakeNode{id: "a", capa: 4, full: true}, &fakeNode{id: "b", capa: 4, used: 3}
	m := master.New(nil, a, b)
	sb, err := m.Create(context.Background(), node.CreateRequest{ID: "s"})
	if err != nil || sb.NodeID != "b" {
		t.Fatalf("%v %v", sb, err)
	}
}

func TestCreateNoNodeUp(t *testing.T) {
	m := master.New(nil)
	if _, err := m.Create(context.Background(), node.CreateRequest{ID: "s"}); !errs.Is(err, errs.Unavailable) {
		t.Fatalf("no node: %v", err)
	}
	m.Add(&fakeNode{id: "a", capa: 4, down: true})
	if _, err := m.Create(context.Background(), node.CreateRequest{ID: "s"}); !errs.Is(err, errs.Unavailable) {
		t.Fatalf("only a down node: %v", err)
	}
	if _, err := m.CreateOn(context.Background(), "a", node.CreateRequest{ID: "s"}); !errs.Is(err, errs.Unavailable) {
		t.Fatalf("create on a down node: %v", err)
	}
	up := &fakeNode{id: "b", capa: 1}
	m.Add(up)
	if sb, err := m.Create(context.Background(), node.CreateRequest{ID: "s"}); err != nil || sb.NodeID != "b" {
		t.Fatalf("%v %v", sb, err)
	}
}

func TestCreateNeedsTemplate(t *testing.T) {
	a := &fakeNode{id: "a", capa: 4, templates: map[string]bool{"base": true}}
	b := &fakeNode{id: "b", capa: 8, templates: map[string]bool{"code": true}}
	m := master.New(nil, fakeTplNode{a}, fakeTplNode{b})
	base := &store.Template{ID: "base"}
	for i := 0; i < 2; i++ {
		sb, err := m.Create(context.Background(), node.CreateRequest{ID: "s", Template: base})
		if err != nil || sb.NodeID != "a" {
			t.Fatalf("base went to %v (%v); only a has it", sb, err)
		}
	}
	if _, err := m.Create(context.Background(), node.CreateRequest{ID: "s", Template: &store.Template{ID: "nowhere"}}); !errs.Is(err, errs.Unavailable) {
		t.Fatalf("a template no node has: %v", err)
	}
}
