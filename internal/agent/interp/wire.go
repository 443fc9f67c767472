package interp

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// The Jupyter messaging protocol (v5.3) over ZeroMQ: a message is the
// multipart frames
//
//	[identities...] "<IDS|MSG>" signature header parent_header metadata content [buffers...]
//
// where signature = hex(HMAC-SHA256(key, header|parent|metadata|content)).

const delimiter = "<IDS|MSG>"

// Header is a Jupyter message header.
type Header struct {
	MsgID    string `json:"msg_id"`
	Session  string `json:"session"`
	Username string `json:"username"`
	Date     string `json:"date"`
	MsgType  string `json:"msg_type"`
	Version  string `json:"version"`
}

// Message is a decoded Jupyter message.
type Message struct {
	Header   Header
	Parent   Header
	Metadata map[string]any
	Content  json.RawMessage
}

func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// signer signs and verifies messages of one kernel connection.
type signer struct {
	key     []byte
	session string
}

func (s *signer) sign(parts ...[]byte) []byte {
	if len(s.key) == 0 {
		return nil
	}
	m := hmac.New(sha256.New, s.key)
	for _, p := range parts {
		m.Write(p)
	}
	return []byte(hex.EncodeToString(m.Sum(nil)))
}

// encode builds the frames of a new message of type t with content c.
func (s *signer) encode(t string, c any) (id string, frames [][]byte, err error) {
	id = newID()
	h, err := json.Marshal(Header{MsgID: id, Session: s.session, Username: "cube", Date: time.Now().UTC().Format(time.RFC3339Nano), MsgType: t, Version: "5.3"})
	if err != nil {
		return "", nil, err
	}
	content, err := json.Marshal(c)
	if err != nil {
		return "", nil, err
	}
	parent, meta := []byte("{}"), []byte("{}")
	return id, [][]byte{[]byte(delimiter), s.sign(h, parent, meta, content), h, parent, meta, content}, nil
}

// decode parses and verifies the frames of a received message.
func (s *signer) decode(frames [][]byte) (*Message, error) {
	i := 0
	for ; i < len(frames); i++ {
		if string(frames[i]) == delimiter {
			break
		}
	}
	if i == len(frames) || len(frames) < i+6 {
		return nil, errs.E(errs.InvalidArgument, "jupyter message too short")
	}
	sig, h, p, md, c := frames[i+1], frames[i+2], frames[i+3], frames[i+4], frames[i+5]
	if len(s.key) > 0 && !hmac.Equal(sig, s.sign(h, p, md, c)) {
		return nil, errs.E(errs.PermissionDenied, "jupyter message with a bad signature")
	}
	m := &Message{Content: append(json.RawMessage(nil), c...)}
	if err := json.Unmarshal(h, &m.Header); err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "jupyter header")
	}
	_ = json.Unmarshal(p, &m.Parent)
	_ = json.Unmarshal(md, &m.Metadata)
	return m, nil
}

func (m *Message) String() string {
	return fmt.Sprintf("%s(parent %s)", m.Header.MsgType, m.Parent.MsgID)
}
