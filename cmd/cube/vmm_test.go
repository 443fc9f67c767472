//go:build linux

package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestCappedWriter(t *testing.T) {
	var b bytes.Buffer
	c := &cappedWriter{w: &b, left: 10}
	for i := 0; i < 5; i++ {
		if n, err := c.Write([]byte("abcd")); n != 4 || err != nil {
			t.Fatalf("write %d: %d %v", i, n, err)
		}
	}
	if !strings.HasPrefix(b.String(), "abcdabcdab\n[cube vmm: console log limit reached") || strings.Count(b.String(), "limit reached") != 1 {
		t.Fatalf("%q", b.String())
	}
}
