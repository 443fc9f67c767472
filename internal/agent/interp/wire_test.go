package interp

import "testing"

func TestWireRoundTripAndSignature(t *testing.T) {
	s := &signer{key: []byte("k"), session: "s"}
	id, frames, err := s.encode("execute_request", map[string]any{"code": "1+1"})
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.decode(append([][]byte{[]byte("ident")}, frames...))
	if err != nil || m.Header.MsgID != id || m.Header.MsgType != "execute_request" {
		t.Fatalf("decode: %v %+v", err, m)
	}
	frames[5] = []byte(`{"code":"evil"}`)
	if _, err := s.decode(frames); err == nil {
		t.Fatal("tampered content accepted")
	}
	for _, bad := range [][][]byte{nil, {[]byte("x")}, {[]byte(delimiter), []byte("sig")}} {
		if _, err := s.decode(bad); err == nil {
			t.Fatalf("short message accepted: %q", bad)
		}
	}
}
