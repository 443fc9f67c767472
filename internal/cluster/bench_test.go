package cluster_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/logging"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
)

// benchTarget is an API URL with a key, and a way to stop it.
type benchTarget struct {
	url, key string
}

func allInOne(b *testing.B) benchTarget {
	ctx := context.Background()
	cfg := config.Default()
	cfg.DataDir = b.TempDir()
	rt, _ := runtimetest.New("")
	rt.Handler = runtimetest.EnvdLike
	rt.BakeTemplate(ctx, runtime.Template{ID: "base"})
	s, err := server.New(ctx, cfg, rt, logging.Discard())
	if err != nil {
		b.Fatal(err)
	}
	s.Store.PutTemplate(ctx, &store.Template{ID: "base", Aliases: []string{"base"}, EnvdVersion: "0.6.13", CPUCount: 1, MemoryMB: 256, DiskMB: 512, State: "ready", Public: true})
	key, _, _ := s.Store.CreateAPIKey(ctx, "b")
	srv := httptest.NewServer(s.Handler())
	b.Cleanup(func() { srv.Close(); s.Close(); rt.Close() })
	return benchTarget{srv.URL, key}
}

func clustered(b *testing.B) benchTarget {
	ctx := context.Background()
	c := startControl(b, b.TempDir(), "")
	key, _, _ := c.s.Store.CreateAPIKey(ctx, "b")
	startNodeTB(b, "n1", 64, c.url())
	return benchTarget{c.url(), key}
}

// BenchmarkProxyHop: one small request through the proxy to a sandbox,
// all-in-one (the proxy dials the runtime in process) against a cluster
// (control proxy -> node API dial upgrade -> runtime). Keep-alive on both.
func BenchmarkProxyHop(b *testing.B) {
	for _, tc := range []struct {
		name string
		mk   func(*testing.B) benchTarget
	}{{"all-in-one", allInOne}, {"cluster", clustered}} {
		b.Run(tc.name, func(b *testing.B) {
			tg := tc.mk(b)
			cl := client.New(tg.url, tg.url, tg.key)
			sb, err := cl.Create(context.Background(), "base", client.CreateOptions{Timeout: 600})
			if err != nil {
				b.Fatal(err)
			}
			hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				req, _ := http.NewRequest("GET", tg.url+"/who", nil)
				req.Header.Set("E2b-Sandbox-Id", sb.SandboxID)
				req.Header.Set("E2b-Sandbox-Port", "49983")
				res, err := hc.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.StatusCode != 200 {
					b.Fatal(res.StatusCode)
				}
			}
		})
	}
}

// BenchmarkCreateKill: create + kill through the API, all-in-one against
// a cluster (the control forwards both and mirrors the records).
func BenchmarkCreateKill(b *testing.B) {
	for _, tc := range []struct {
		name string
		mk   func(*testing.B) benchTarget
	}{{"all-in-one", allInOne}, {"cluster", clustered}} {
		b.Run(tc.name, func(b *testing.B) {
			tg := tc.mk(b)
			cl := client.New(tg.url, tg.url, tg.key)
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				sb, err := cl.Create(ctx, "base", client.CreateOptions{Timeout: 600})
				if err != nil {
					b.Fatal(err)
				}
				if err := cl.Kill(ctx, sb.SandboxID); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
