package errs

import "context"

func errContextDeadline() error { return context.DeadlineExceeded }
func errContextCanceled() error { return context.Canceled }
