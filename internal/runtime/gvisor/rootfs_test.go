//go:build linux

package gvisor

import (
	"os"
	"testing"
)

func testRootfs(t testing.TB) string {
	p := os.Getenv("CUBE_TEST_ROOTFS")
	if p == "" {
		t.Skip("no rootfs")
	}
	return p
}
