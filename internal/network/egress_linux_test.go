//go:build linux

package network

import (
	"strings"
	"testing"
)

func TestDefaultEgressThroughHostNAT(t *testing.T) {
	s := acquire(t, env.nsMgr)
	ns := guestNS(t, s)
	body, err := httpGet(ns, env.url(env.inetA))
	if err != nil {
		t.Fatalf("GET from sandbox: %v", err)
	}
	if !strings.HasPrefix(body, "internet ") {
		t.Fatalf("body %q", body)
	}
}
