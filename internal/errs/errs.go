// Package errs is Cube's one error vocabulary. Every layer returns errors
// that carry a Kind; the edges (REST API, Connect RPC, CLI) map the Kind to
// an HTTP status or a Connect code. Messages in an *Error are safe to show
// to users; wrapped causes are logged, not shown.
package errs

import (
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Kind classifies an error for mapping at the edge.
type Kind int

const (
	Internal           Kind = iota // a bug or an unexpected failure (500)
	InvalidArgument                // malformed or out-of-range input (400)
	Unauthenticated                // missing or bad credentials (401)
	PermissionDenied               // authenticated but not allowed (403)
	NotFound                       // no such object (404)
	Conflict                       // wrong state for the operation (409)
	AlreadyExists                  // object exists (409)
	TooLarge                       // request or upload too large (413)
	ResourceExhausted              // capacity or rate limit (429)
	Unavailable                    // temporarily unable, retry later (503)
	Timeout                        // deadline exceeded (504)
	Unimplemented                  // not supported (501)
	Canceled                       // the caller went away (499)
	FailedPrecondition             // the system is not in a state to do this (400 / failed_precondition)
)

var kindNames = map[Kind]string{
	Internal: "internal", InvalidArgument: "invalid_argument", Unauthenticated: "unauthenticated",
	PermissionDenied: "permission_denied", NotFound: "not_found", Conflict: "conflict",
	AlreadyExists: "already_exists", TooLarge: "too_large", ResourceExhausted: "resource_exhausted",
	Unavailable: "unavailable", Timeout: "deadline_exceeded", Unimplemented: "unimplemented",
	Canceled: "canceled", FailedPrecondition: "failed_precondition",
}

func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Error is an error with a Kind and a user-facing message.
type Error struct {
	Kind       Kind
	Msg        string        // shown to users
	Err        error         // cause, logged only
	RetryAfter time.Duration // for ResourceExhausted / Unavailable, if known
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// E builds an *Error with a formatted message.
func E(k Kind, format string, args ...any) *Error {
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...)}
}

// Wrap builds an *Error of kind k around cause err. A nil err returns nil.
func Wrap(k Kind, err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...), Err: err}
}

// KindOf returns the Kind of the first *Error in err's chain, mapping
// context errors; anything else is Internal.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	switch {
	case err == nil:
		return Internal
	case errors.Is(err, errContextDeadline()):
		return Timeout
	case errors.Is(err, errContextCanceled()):
		return Canceled
	}
	return Internal
}

// Is reports whether err has kind k.
func Is(err error, k Kind) bool { return err != nil && KindOf(err) == k }

// Message returns the user-facing message: the *Error's Msg, or a generic
// text for internal errors so that causes never leak.
func Message(err error) string {
	var e *Error
	if errors.As(err, &e) {
		if e.Kind == Internal && e.Msg == "" {
			return "internal error"
		}
		return e.Msg
	}
	switch KindOf(err) {
	case Timeout:
		return "deadline exceeded"
	case Canceled:
		return "request canceled"
	}
	return "internal error"
}

// RetryAfterOf returns the retry hint of err, if any.
func RetryAfterOf(err error) time.Duration {
	var e *Error
	if errors.As(err, &e) {
		return e.RetryAfter
	}
	return 0
}

// HTTPStatus maps a Kind to an HTTP status code.
func HTTPStatus(k Kind) int {
	switch k {
	case InvalidArgument, FailedPrecondition:
		return http.StatusBadRequest
	case Unauthenticated:
		return http.StatusUnauthorized
	case PermissionDenied:
		return http.StatusForbidden
	case NotFound:
		return http.StatusNotFound
	case Conflict, AlreadyExists:
		return http.StatusConflict
	case TooLarge:
		return http.StatusRequestEntityTooLarge
	case ResourceExhausted:
		return http.StatusTooManyRequests
	case Unavailable:
		return http.StatusServiceUnavailable
	case Timeout:
		return http.StatusGatewayTimeout
	case Unimplemented:
		return http.StatusNotImplemented
	case Canceled:
		return 499
	}
	return http.StatusInternalServerError
}

// ConnectCode maps a Kind to a Connect protocol code name (as used in
// Connect error bodies); internal/agent maps these to connect.Code values.
func ConnectCode(k Kind) string {
	switch k {
	case InvalidArgument:
		return "invalid_argument"
	case Unauthenticated:
		return "unauthenticated"
	case PermissionDenied:
		return "permission_denied"
	case NotFound:
		return "not_found"
	case Conflict, AlreadyExists:
		return "already_exists"
	case TooLarge, ResourceExhausted:
		return "resource_exhausted"
	case Unavailable:
		return "unavailable"
	case Timeout:
		return "deadline_exceeded"
	case Unimplemented:
		return "unimplemented"
	case Canceled:
		return "canceled"
	case FailedPrecondition:
		return "failed_precondition"
	}
	return "internal"
}
