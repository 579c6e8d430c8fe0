// Package wire holds the bits of Tower's (v0.2.1) wire format shared by the
// Go test peers: the websocket-as-byte-stream adapter, the `config` request
// body, the SSH identification strings and algorithm lists, and a
// half-close-aware byte pump.
package wire

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// Subprotocol is the websocket subprotocol the agent asks for.
const Subprotocol = "kubesphere-v1"

// WSConn turns a websocket into a net.Conn carrying a plain byte stream:
// every Write is sent as one binary message; Read concatenates the payloads
// of all data messages (binary and text), so message boundaries carry no
// meaning. No ping/pong is sent and Close sends no close frame (like Tower).
type WSConn struct {
	ws *websocket.Conn

	rmu     sync.Mutex
	r       io.Reader
	readErr error

	wmu sync.Mutex
}

var _ net.Conn = (*WSConn)(nil)

// NewWSConn wraps an established websocket.
func NewWSConn(ws *websocket.Conn) *WSConn { return &WSConn{ws: ws} }

// Read reads from the current message, moving on to the next one when it is
// exhausted. It never returns 0, nil.
func (c *WSConn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if c.readErr != nil {
			// Sticky: gorilla panics on repeated reads of a failed conn.
			return 0, c.readErr
		}
		if c.r == nil {
			_, r, err := c.ws.NextReader()
			if err != nil {
				c.readErr = mapReadErr(err)
				return 0, c.readErr
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if err == io.EOF {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		if err != nil {
			c.readErr = mapReadErr(err)
			if n > 0 {
				return n, nil
			}
			return 0, c.readErr
		}
		if n > 0 {
			return n, nil
		}
	}
}

// mapReadErr turns the websocket's end-of-stream conditions (close frame,
// TCP EOF without close frame) into io.EOF.
func mapReadErr(err error) error {
	var ce *websocket.CloseError
	if errors.As(err, &ce) || errors.Is(err, io.ErrUnexpectedEOF) {
		return io.EOF
	}
	return err
}

// Write sends p as one binary message.
func (c *WSConn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close closes the underlying TCP connection without a close frame.
func (c *WSConn) Close() error { return c.ws.UnderlyingConn().Close() }

func (c *WSConn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *WSConn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *WSConn) SetDeadline(t time.Time) error {
	return c.ws.UnderlyingConn().SetDeadline(t)
}

func (c *WSConn) SetReadDeadline(t time.Time) error {
	return c.ws.UnderlyingConn().SetReadDeadline(t)
}

func (c *WSConn) SetWriteDeadline(t time.Time) error {
	return c.ws.UnderlyingConn().SetWriteDeadline(t)
}
