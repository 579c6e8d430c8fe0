// Package proxy is a Go Tower (v0.2.1) compatible proxy: an HTTP server whose
// websocket upgrades carry an SSH server; agents authenticate with the
// `config` global request; a TCP forward listener opens `kubesphere` channels
// on the current agent session.
package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/crypto/ssh"

	"github.com/kubesphere-rs/tower/tests/go-peers/wire"
)

// Version is served on GET /version.
const Version = "go-proxy (Go Tower v0.2.1 wire peer)"

// ConfigTimeout is how long a new session may take to send `config`.
const ConfigTimeout = 10 * time.Second

// Options configure a proxy.
type Options struct {
	Name            string
	Token           string
	Target          string // channel target; empty: the agent's KubernetesSvcHost
	TowerAlgorithms bool
	ConfigTimeout   time.Duration // 0: ConfigTimeout (10 s)
	// Clusters are more accepted agents (name -> token), Go Tower style.
	Clusters map[string]string
	// OnConnect, if set, runs for an authenticated agent before the
	// `config` reply (Go Tower starts the cluster's listeners there); an
	// error is sent as the failure text. release runs when the session ends.
	OnConnect func(conn *ssh.ServerConn, cfg wire.AgentConfig) (release func(), err error)
	// Event receives the stdout lines ("agent <name> connected", ...).
	Event func(line string)
	Log   func(format string, args ...any)
}

// Proxy is the HTTP handler plus the forward logic.
type Proxy struct {
	opts      Options
	sshConfig *ssh.ServerConfig
	upgrader  websocket.Upgrader
	HostKey   ssh.PublicKey

	mu      sync.Mutex
	current *session
}

type session struct {
	conn   *ssh.ServerConn
	config wire.AgentConfig
}

// New makes a proxy with a fresh ECDSA P-256 host key.
func New(opts Options) (*Proxy, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	signer, err := ssh.NewSignerFromKey(key)
	if err != nil {
		return nil, err
	}
	cfg := &ssh.ServerConfig{
		ServerVersion: wire.ServerVersion,
		PasswordCallback: func(ssh.ConnMetadata, []byte) (*ssh.Permissions, error) {
			return nil, nil // any user/password; real auth is `config`
		},
	}
	if opts.TowerAlgorithms {
		wire.ApplyTowerAlgorithms(&cfg.Config)
	}
	cfg.AddHostKey(signer)
	p := &Proxy{
		opts:      opts,
		sshConfig: cfg,
		HostKey:   signer.PublicKey(),
		// No Subprotocols: the 101 answer does not echo kubesphere-v1 (like
		// Go Tower). Agents send no Origin; accept any.
		upgrader: websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }},
	}
	return p, nil
}

func (p *Proxy) event(format string, args ...any) {
	if p.opts.Event != nil {
		p.opts.Event(fmt.Sprintf(format, args...))
	}
}

func (p *Proxy) logf(format string, args ...any) {
	if p.opts.Log != nil {
		p.opts.Log(format, args...)
	}
}

func isTunnelRequest(r *http.Request) bool {
	if !websocket.IsWebSocketUpgrade(r) {
		return false
	}
	for _, sp := range websocket.Subprotocols(r) {
		if strings.EqualFold(sp, wire.Subprotocol) {
			return true
		}
	}
	return false
}

// ServeHTTP: tunnel upgrades, /health, /version, else 404.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case isTunnelRequest(r):
		ws, err := p.upgrader.Upgrade(w, r, nil)
		if err != nil {
			p.logf("upgrade from %s: %v", r.RemoteAddr, err)
			return
		}
		go p.serveTunnel(wire.NewWSConn(ws))
	case r.Method == http.MethodGet && r.URL.Path == "/health":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, "OK\n")
	case r.Method == http.MethodGet && r.URL.Path == "/version":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, Version)
	default:
		http.NotFound(w, r)
	}
}

func (p *Proxy) serveTunnel(conn net.Conn) {
	// Bound the whole handshake + config by ConfigTimeout.
	wait := p.opts.ConfigTimeout
	if wait <= 0 {
		wait = ConfigTimeout
	}
	timer := time.AfterFunc(wait, func() { conn.Close() })
	sconn, chans, reqs, err := ssh.NewServerConn(conn, p.sshConfig)
	if err != nil {
		timer.Stop()
		conn.Close()
		p.logf("ssh handshake from %s: %v", conn.RemoteAddr(), err)
		return
	}
	// Agent-opened channels are not served (Tower's open door).
	go func() {
		for nc := range chans {
			nc.Reject(ssh.Prohibited, "agent-opened channels are not allowed")
		}
	}()

	var sess *session
	for req := range reqs {
		switch {
		case req.Type == wire.ConfigRequest && sess == nil:
			var cfg wire.AgentConfig
			if err := json.Unmarshal(req.Payload, &cfg); err != nil {
				reason := "invalid config: " + err.Error()
				// Event first, so that it is out before the agent sees the reply.
				p.event("agent %s rejected: %s", "", reason)
				req.Reply(false, []byte(reason))
				sconn.Close()
				continue
			}
			if !p.accepts(cfg) {
				p.event("agent %s rejected: %s", cfg.Name, wire.Unauthorized)
				req.Reply(false, []byte(wire.Unauthorized))
				sconn.Close()
				continue
			}
			if p.opts.OnConnect != nil {
				release, err := p.opts.OnConnect(sconn, cfg)
				if err != nil {
					p.event("agent %s rejected: %s", cfg.Name, err)
					req.Reply(false, []byte(err.Error()))
					sconn.Close()
					continue
				}
				defer release()
			}
			timer.Stop()
			sess = &session{conn: sconn, config: cfg}
			p.mu.Lock()
			p.current = sess
			p.mu.Unlock()
			p.event("agent %s connected", cfg.Name)
			req.Reply(true, nil)
		case req.Type == wire.PingRequest:
			req.Reply(true, nil)
		default:
			req.Reply(false, nil)
		}
	}
	timer.Stop()
	sconn.Close()
	if sess != nil {
		p.mu.Lock()
		if p.current == sess {
			p.current = nil
		}
		p.mu.Unlock()
		err := sconn.Wait()
		p.logf("agent %s disconnected: %v", sess.config.Name, err)
	}
}

func (p *Proxy) accepts(cfg wire.AgentConfig) bool {
	if cfg.Name == p.opts.Name && cfg.Token == p.opts.Token && (p.opts.Name != "" || len(p.opts.Clusters) == 0) {
		return true
	}
	token, ok := p.opts.Clusters[cfg.Name]
	return ok && token != "" && cfg.Token == token
}

// Forward accepts TCP connections on l and pipes each through a new
// `kubesphere` channel on the current agent session.
func (p *Proxy) Forward(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go p.forward(c)
	}
}

func (p *Proxy) forward(c net.Conn) {
	p.mu.Lock()
	sess := p.current
	p.mu.Unlock()
	tcp, ok := c.(*net.TCPConn)
	if sess == nil || !ok {
		c.Close()
		return
	}
	target := p.opts.Target
	if target == "" {
		target = sess.config.KubernetesSvcHost
	}
	ch, reqs, err := sess.conn.OpenChannel(wire.ChannelType, []byte(target))
	if err != nil {
		p.logf("open channel to %s: %v", target, err)
		c.Close()
		return
	}
	go ssh.DiscardRequests(reqs)
	wire.Pipe(tcp, ch)
}
