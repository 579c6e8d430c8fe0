package wire

import (
	"io"
	"sync"
)

// CopyBufferSize is the buffer size of each copy direction.
const CopyBufferSize = 64 << 10

// HalfCloser is a byte stream whose write side can be closed on its own
// (*net.TCPConn, ssh.Channel).
type HalfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Pipe copies bytes both ways between a and b with 64 KiB buffers. When one
// side's read ends, the other side's write half is closed; when both
// directions are done both are closed. It returns the byte counts a->b and
// b->a.
func Pipe(a, b HalfCloser) (aToB, bToA int64) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		aToB = copyHalf(b, a)
	}()
	go func() {
		defer wg.Done()
		bToA = copyHalf(a, b)
	}()
	wg.Wait()
	a.Close()
	b.Close()
	return
}

func copyHalf(dst, src HalfCloser) int64 {
	buf := make([]byte, CopyBufferSize)
	// Hide ReaderFrom/WriterTo so that the 64 KiB buffer is really used
	// (net.TCPConn would otherwise fall back to io.Copy's 32 KiB).
	n, _ := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, buf)
	dst.CloseWrite()
	return n
}
