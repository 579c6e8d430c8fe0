// Package agent is a Go Tower (v0.2.1) compatible agent: it dials the proxy
// over a websocket, runs an SSH client over it, authenticates with the
// `config` global request and serves `kubesphere` channels by dialling their
// target over TCP.
package agent

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/crypto/ssh"

	"github.com/kubesphere-rs/tower/tests/go-peers/wire"
)

// Options configure an agent.
type Options struct {
	ProxyServer       string // http(s)://host[:port][/path]
	Name              string
	Token             string
	KubernetesService string // host:port
	KubeSphereService string // host:port
	Keepalive         time.Duration
	CAData            []byte
	CertData          []byte
	KeyData           []byte
	BearerToken       []byte
	TowerAlgorithms   bool // restrict SSH algorithms to Go Tower v0.2.1's
	ExpectHostKey     string
	TLSConfig         *tls.Config // for wss://, nil: system roots
	// WSBufferSize is the websocket read/write buffer size. Go Tower's agent
	// uses 1024, so its messages go out as ~1 KiB frames (one binary frame
	// followed by continuation frames); 0 means 1024.
	WSBufferSize int
	Log          func(format string, args ...any)
}

// ConfigRejectedError is returned when the proxy answers `config` with failure.
type ConfigRejectedError struct{ Reason string }

func (e *ConfigRejectedError) Error() string { return "config rejected: " + e.Reason }

// ErrHandshake wraps a failed SSH handshake (Go Tower's agent gives up on it).
var ErrHandshake = errors.New("ssh handshake")

// Session is a connected agent.
type Session struct {
	Conn ssh.Conn
	opts Options
	done chan struct{}
	err  error
}

func (o *Options) logf(format string, args ...any) {
	if o.Log != nil {
		o.Log(format, args...)
	}
}

// WebsocketURL maps --proxy-server to the websocket URL.
func WebsocketURL(proxyServer string) (string, error) {
	u, err := url.Parse(proxyServer)
	if err != nil {
		return "", err
	}
	switch u.Scheme {
	case "http", "ws":
		u.Scheme = "ws"
	case "https", "wss":
		u.Scheme = "wss"
	default:
		return "", fmt.Errorf("unsupported proxy server scheme %q", u.Scheme)
	}
	if u.Host == "" {
		return "", fmt.Errorf("proxy server %q has no host", proxyServer)
	}
	return u.String(), nil
}

// Connect dials the proxy, does the SSH handshake and the `config` request
// and starts serving channels, global requests and keepalives.
func Connect(opts Options) (*Session, error) {
	wsURL, err := WebsocketURL(opts.ProxyServer)
	if err != nil {
		return nil, err
	}
	bufSize := opts.WSBufferSize
	if bufSize <= 0 {
		bufSize = 1024
	}
	dialer := websocket.Dialer{
		Proxy:            http.ProxyFromEnvironment, // HTTP(S)_PROXY, NO_PROXY
		HandshakeTimeout: 45 * time.Second,
		ReadBufferSize:   bufSize,
		WriteBufferSize:  bufSize,
		Subprotocols:     []string{wire.Subprotocol},
		TLSClientConfig:  opts.TLSConfig,
	}
	ws, resp, err := dialer.Dial(wsURL, nil)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("websocket dial %s: %w (HTTP %s)", wsURL, err, resp.Status)
		}
		return nil, fmt.Errorf("websocket dial %s: %w", wsURL, err)
	}
	conn := wire.NewWSConn(ws)

	cfg := &ssh.ClientConfig{
		User:          "",
		Auth:          []ssh.AuthMethod{ssh.Password("")},
		ClientVersion: wire.ClientVersion,
		HostKeyCallback: func(hostname string, remote net.Addr, key ssh.PublicKey) error {
			fp := ssh.FingerprintSHA256(key)
			opts.logf("proxy host key %s %s", key.Type(), fp)
			if opts.ExpectHostKey != "" && fp != opts.ExpectHostKey {
				return fmt.Errorf("host key %s does not match expected %s", fp, opts.ExpectHostKey)
			}
			return nil
		},
	}
	if opts.TowerAlgorithms {
		wire.ApplyTowerAlgorithms(&cfg.Config)
		cfg.HostKeyAlgorithms = append([]string(nil), wire.TowerHostKeyAlgorithms...)
	}
	sconn, chans, reqs, err := ssh.NewClientConn(conn, ws.RemoteAddr().String(), cfg)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	// Answer (false) whatever global requests the proxy sends.
	go ssh.DiscardRequests(reqs)

	body, err := json.Marshal(wire.AgentConfig{
		Version:           wire.AgentVersion,
		Name:              opts.Name,
		Token:             opts.Token,
		KubernetesSvcHost: opts.KubernetesService,
		KubeSphereSvcHost: opts.KubeSphereService,
		CertData:          opts.CertData,
		KeyData:           opts.KeyData,
		CAData:            opts.CAData,
		BearerToken:       opts.BearerToken,
	})
	if err != nil {
		sconn.Close()
		return nil, err
	}
	ok, reply, err := sconn.SendRequest(wire.ConfigRequest, true, body)
	if err != nil {
		sconn.Close()
		return nil, fmt.Errorf("config request: %w", err)
	}
	// Go Tower's agent looks only at the payload (non-empty = rejected);
	// be stricter and treat either signal as a rejection.
	if !ok || len(reply) > 0 {
		sconn.Close()
		return nil, &ConfigRejectedError{Reason: string(reply)}
	}

	s := &Session{Conn: sconn, opts: opts, done: make(chan struct{})}
	go s.serveChannels(chans)
	go func() {
		s.err = sconn.Wait()
		close(s.done)
	}()
	if opts.Keepalive > 0 {
		go s.keepalive()
	}
	return s, nil
}

// Wait blocks until the SSH connection is gone and returns why.
func (s *Session) Wait() error {
	<-s.done
	if s.err == nil {
		return io.EOF
	}
	return s.err
}

// Close closes the connection.
func (s *Session) Close() error { return s.Conn.Close() }

func (s *Session) keepalive() {
	t := time.NewTicker(s.opts.Keepalive)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
			if _, _, err := s.Conn.SendRequest(wire.PingRequest, true, nil); err != nil {
				s.opts.logf("keepalive failed: %v", err)
				s.Conn.Close()
				return
			}
		}
	}
}

func (s *Session) serveChannels(chans <-chan ssh.NewChannel) {
	for nc := range chans {
		if nc.ChannelType() != wire.ChannelType {
			nc.Reject(ssh.UnknownChannelType, "unknown channel type "+nc.ChannelType())
			continue
		}
		go s.handleChannel(nc)
	}
}

func (s *Session) handleChannel(nc ssh.NewChannel) {
	target := string(nc.ExtraData())
	s.opts.logf("channel to %s", target)
	// Like Go Tower: accept first, then dial; a failed dial closes the
	// channel (the proxy sees OPEN_CONFIRMATION followed by CLOSE).
	ch, reqs, err := nc.Accept()
	if err != nil {
		return
	}
	go ssh.DiscardRequests(reqs)
	d := net.Dialer{Timeout: 30 * time.Second}
	c, err := d.Dial("tcp", target)
	if err != nil {
		s.opts.logf("channel to %s: %v", target, err)
		ch.Close()
		return
	}
	tcp, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		ch.Close()
		return
	}
	wire.Pipe(ch, tcp)
}

// IsRejected reports whether err is a config rejection, and its reason.
func IsRejected(err error) (string, bool) {
	var re *ConfigRejectedError
	if errors.As(err, &re) {
		return re.Reason, true
	}
	return "", false
}
