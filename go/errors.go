package oxcow

import (
	"fmt"
	"syscall"

	"oxcow.dev/oxcow/internal/capi"
)

// Error is a failed oxcow operation.
//
// Errno is what the library returned (negated): EINVAL for a bad argument or a request beyond
// the virtual size, EROFS for a write to a read-only image, EAGAIN when another process holds
// the image's lock, ENOTSUP for an unsupported feature, EUCLEAN for a corrupt image,
// ENOMEDIUM once the handle has been fenced after corruption, EBADF after Close, for bitmaps
// EEXIST (name taken), ENOENT (no such bitmap) and EBUSY (inconsistent bitmap), and the file
// system's errors (ENOENT, EACCES, ENOSPC, EIO, ...). Message is the library's description
// when the C call provides one (open, create, reopen, check) or a description built by this
// package; it may be empty.
//
// errors.Is(err, syscall.EINVAL) and errors.Is(err, fs.ErrNotExist) work through Unwrap.
type Error struct {
	Op      string // "open", "create", "read", "write", "write zeroes", "discard", ...
	Path    string // the image file, when known
	Errno   syscall.Errno
	Message string
}

func (e *Error) Error() string {
	s := "oxcow " + e.Op
	if e.Path != "" {
		s += " " + e.Path
	}
	msg := e.Message
	if msg == "" {
		msg = e.Errno.Error()
	}
	return s + ": " + msg
}

// Unwrap returns the errno, so that errors.Is(err, syscall.EXXX) matches.
func (e *Error) Unwrap() error { return e.Errno }

func wrap(op, path string, e *capi.Err) error {
	if e == nil {
		return nil
	}
	return &Error{Op: op, Path: path, Errno: e.Errno, Message: e.Message}
}

func newError(op, path string, errno syscall.Errno, format string, args ...interface{}) error {
	return &Error{Op: op, Path: path, Errno: errno, Message: fmt.Sprintf(format, args...)}
}
