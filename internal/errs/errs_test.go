package errs

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
)

func TestKindMapping(t *testing.T) {
	cases := []struct {
		err    error
		status int
		code   string
		msg    string
	}{
		{E(NotFound, "sandbox %q not found", "x"), http.StatusNotFound, "not_found", `sandbox "x" not found`},
		{fmt.Errorf("ctx: %w", E(InvalidArgument, "bad")), http.StatusBadRequest, "invalid_argument", "bad"},
		{Wrap(Conflict, errors.New("secret cause"), "sandbox is paused"), http.StatusConflict, "already_exists", "sandbox is paused"},
		{errors.New("raw failure with secrets"), http.StatusInternalServerError, "internal", "internal error"},
		{fmt.Errorf("op: %w", context.DeadlineExceeded), http.StatusGatewayTimeout, "deadline_exceeded", "deadline exceeded"},
		{E(ResourceExhausted, "node full"), http.StatusTooManyRequests, "resource_exhausted", "node full"},
	}
	for _, c := range cases {
		k := KindOf(c.err)
		if got := HTTPStatus(k); got != c.status {
			t.Errorf("%v: status %d, want %d", c.err, got, c.status)
		}
		if got := ConnectCode(k); got != c.code {
			t.Errorf("%v: code %s, want %s", c.err, got, c.code)
		}
		if got := Message(c.err); got != c.msg {
			t.Errorf("%v: message %q, want %q", c.err, got, c.msg)
		}
	}
	if Wrap(Internal, nil, "x") != nil {
		t.Fatal("Wrap(nil) must be nil")
	}
}
