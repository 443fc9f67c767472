//go:build linux

package envd

import (
	"testing"

	"connectrpc.com/connect"

	"github.com/cubesandbox/cube/internal/errs"
)

// TestConnectErrCodes pins the errs.Kind -> connect.Code mapping.
func TestConnectErrCodes(t *testing.T) {
	want := map[errs.Kind]connect.Code{
		errs.Internal:           connect.CodeInternal,
		errs.InvalidArgument:    connect.CodeInvalidArgument,
		errs.Unauthenticated:    connect.CodeUnauthenticated,
		errs.PermissionDenied:   connect.CodePermissionDenied,
		errs.NotFound:           connect.CodeNotFound,
		errs.Conflict:           connect.CodeAlreadyExists,
		errs.AlreadyExists:      connect.CodeAlreadyExists,
		errs.TooLarge:           connect.CodeResourceExhausted,
		errs.ResourceExhausted:  connect.CodeResourceExhausted,
		errs.Unavailable:        connect.CodeUnavailable,
		errs.Timeout:            connect.CodeDeadlineExceeded,
		errs.Unimplemented:      connect.CodeUnimplemented,
		errs.Canceled:           connect.CodeCanceled,
		errs.FailedPrecondition: connect.CodeFailedPrecondition,
	}
	for k, c := range want {
		err := connectErr(errs.E(k, "boom %d", 1))
		if got := connect.CodeOf(err); got != c {
			t.Errorf("kind %v: code %v, want %v", k, got, c)
		}
		if msg := err.(*connect.Error).Message(); msg != "boom 1" {
			t.Errorf("kind %v: message %q", k, msg)
		}
	}
	if connectErr(nil) != nil {
		t.Error("connectErr(nil) != nil")
	}
}
