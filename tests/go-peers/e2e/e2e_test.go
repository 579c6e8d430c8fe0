// Package e2e runs the Go agent against the Go proxy in-process.
package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"golang.org/x/crypto/ssh"

	"github.com/kubesphere-rs/tower/tests/go-peers/agent"
	"github.com/kubesphere-rs/tower/tests/go-peers/proxy"
	"github.com/kubesphere-rs/tower/tests/go-peers/wire"
)

func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// echoServer echoes until EOF, then half-closes.
func echoServer(t *testing.T) string {
	l := listen(t)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				buf := make([]byte, 64<<10)
				io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, buf)
				c.(*net.TCPConn).CloseWrite()
				c.Close()
			}()
		}
	}()
	return l.Addr().String()
}

type events struct {
	mu    sync.Mutex
	lines []string
}

func (e *events) add(l string) {
	e.mu.Lock()
	e.lines = append(e.lines, l)
	e.mu.Unlock()
}

func (e *events) has(l string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, x := range e.lines {
		if x == l {
			return true
		}
	}
	return false
}

func startProxy(t *testing.T, opts proxy.Options) (httpAddr, fwdAddr string, ev *events) {
	t.Helper()
	ev = &events{}
	opts.Event = ev.add
	opts.Log = t.Logf
	p, err := proxy.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	hl, fl := listen(t), listen(t)
	srv := &http.Server{Handler: p}
	go srv.Serve(hl)
	t.Cleanup(func() { srv.Close() })
	go p.Forward(fl)
	return hl.Addr().String(), fl.Addr().String(), ev
}

func roundTrip(t *testing.T, addr string, data []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	go func() {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	want := sha256.Sum256(data)
	if n != int64(len(data)) || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatalf("echo mismatch: got %d bytes, want %d (or sha256 differs)", n, len(data))
	}
}

func TestEndToEnd(t *testing.T) {
	echo := echoServer(t)
	httpAddr, fwd, ev := startProxy(t, proxy.Options{Name: "c1", Token: "t1", TowerAlgorithms: true})

	// Plain HTTP routes.
	for path, want := range map[string]string{"/health": "OK\n", "/version": proxy.Version + "\n"} {
		resp, err := http.Get("http://" + httpAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != want {
			t.Fatalf("GET %s: %d %q", path, resp.StatusCode, b)
		}
	}
	if resp, err := http.Get("http://" + httpAddr + "/nope"); err != nil || resp.StatusCode != 404 {
		t.Fatalf("GET /nope: %v %v", resp, err)
	}

	// The 101 answer does not echo the subprotocol (like Go Tower).
	d := websocket.Dialer{Subprotocols: []string{wire.Subprotocol}}
	ws, resp, err := d.Dial("ws://"+httpAddr+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "" {
		t.Fatalf("subprotocol echoed: %q", got)
	}
	ws.Close()

	// No agent yet: forward connections are closed.
	if c, err := net.Dial("tcp", fwd); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("read %d bytes without agent", n)
		}
		c.Close()
	}

	base := agent.Options{
		ProxyServer:       "http://" + httpAddr,
		Name:              "c1",
		KubernetesService: echo,
		KubeSphereService: "127.0.0.1:1",
		Keepalive:         100 * time.Millisecond,
		TowerAlgorithms:   true,
		CAData:            []byte("-----BEGIN CERTIFICATE-----\n"),
		BearerToken:       []byte("bearer"),
		Log:               t.Logf,
	}

	bad := base
	bad.Token = "wrong"
	_, err = agent.Connect(bad)
	if reason, ok := agent.IsRejected(err); !ok || reason != wire.Unauthorized {
		t.Fatalf("wrong token: %v", err)
	}
	if !ev.has("agent c1 rejected: Unauthorized agent") {
		t.Fatalf("events: %v", ev.lines)
	}

	good := base
	good.Token = "t1"
	s, err := agent.Connect(good)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !ev.has("agent c1 connected") {
		t.Fatalf("events: %v", ev.lines)
	}

	data := make([]byte, 8<<20)
	rand.Read(data)
	roundTrip(t, fwd, data)
	roundTrip(t, fwd, nil) // immediate half-close

	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			roundTrip(t, fwd, data[:1<<20])
		}()
	}
	wg.Wait()
	time.Sleep(300 * time.Millisecond) // a few keepalives
	roundTrip(t, fwd, []byte("after keepalives"))
}

// rawTunnel dials the proxy like an agent would, with a custom SSH config.
func rawTunnel(t *testing.T, httpAddr string, cfg *ssh.ClientConfig, body string) (bool, string, error) {
	d := websocket.Dialer{Subprotocols: []string{wire.Subprotocol}}
	ws, _, err := d.Dial("ws://"+httpAddr, nil)
	if err != nil {
		return false, "", err
	}
	conn, _, reqs, err := ssh.NewClientConn(wire.NewWSConn(ws), "", cfg)
	if err != nil {
		return false, "", err
	}
	defer conn.Close()
	go ssh.DiscardRequests(reqs)
	ok, reply, err := conn.SendRequest(wire.ConfigRequest, true, []byte(body))
	return ok, string(reply), err
}

func baseClientConfig() *ssh.ClientConfig {
	cfg := &ssh.ClientConfig{
		Auth:            []ssh.AuthMethod{ssh.Password("")},
		ClientVersion:   wire.ClientVersion,
		HostKeyCallback: ssh.InsecureIgnoreHostKey(),
	}
	wire.ApplyTowerAlgorithms(&cfg.Config)
	cfg.HostKeyAlgorithms = wire.TowerHostKeyAlgorithms
	return cfg
}

// The proxy accepts each Tower algorithm on its own, and malformed config.
func TestProxyAlgorithmsAndConfig(t *testing.T) {
	httpAddr, _, ev := startProxy(t, proxy.Options{Name: "c1", Token: "t1", TowerAlgorithms: true})
	good := `{"Version":"v0.2.1","Name":"c1","Token":"t1","KubernetesSvcHost":"a:1","KubeSphereSvcHost":"b:2"}`
	try := func(name string, mut func(*ssh.ClientConfig)) {
		cfg := baseClientConfig()
		mut(cfg)
		ok, reply, err := rawTunnel(t, httpAddr, cfg, good)
		if err != nil || !ok || reply != "" {
			t.Errorf("%s: ok=%v reply=%q err=%v", name, ok, reply, err)
		}
	}
	for _, k := range wire.TowerKeyExchanges {
		try("kex "+k, func(c *ssh.ClientConfig) { c.KeyExchanges = []string{k} })
	}
	for _, k := range wire.TowerCiphers {
		try("cipher "+k, func(c *ssh.ClientConfig) { c.Ciphers = []string{k} })
	}
	for _, m := range wire.TowerMACs {
		try("mac "+m, func(c *ssh.ClientConfig) {
			c.Ciphers = []string{"aes256-ctr"}
			c.MACs = []string{m}
		})
	}
	ok, reply, err := rawTunnel(t, httpAddr, baseClientConfig(), `{"Name":`)
	if err != nil || ok || !strings.HasPrefix(reply, "invalid config") {
		t.Errorf("malformed config: ok=%v reply=%q err=%v", ok, reply, err)
	}
	if !ev.has("agent  rejected: " + reply) {
		t.Errorf("events: %v", ev.lines)
	}
	ok, reply, _ = rawTunnel(t, httpAddr, baseClientConfig(), strings.Replace(good, `"c1"`, `"c2"`, 1))
	if ok || reply != wire.Unauthorized {
		t.Errorf("wrong name: ok=%v reply=%q", ok, reply)
	}
}

// A session that sends no config is dropped after the config timeout.
func TestConfigTimeout(t *testing.T) {
	httpAddr, _, _ := startProxy(t, proxy.Options{Name: "c1", Token: "t1", TowerAlgorithms: true,
		ConfigTimeout: 300 * time.Millisecond})
	d := websocket.Dialer{Subprotocols: []string{wire.Subprotocol}}
	ws, _, err := d.Dial("ws://"+httpAddr, nil)
	if err != nil {
		t.Fatal(err)
	}
	conn, _, reqs, err := ssh.NewClientConn(wire.NewWSConn(ws), "", baseClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	go ssh.DiscardRequests(reqs)
	done := make(chan error, 1)
	go func() { done <- conn.Wait() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("session without config not dropped")
	}
}

// fakeProxy is a minimal Tower-like SSH server restricted by mut, with the
// given host key; it accepts any config.
func fakeProxy(t *testing.T, key any, mut func(*ssh.ServerConfig)) string {
	signer, err := ssh.NewSignerFromKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &ssh.ServerConfig{
		ServerVersion:    wire.ServerVersion,
		PasswordCallback: func(ssh.ConnMetadata, []byte) (*ssh.Permissions, error) { return nil, nil },
	}
	wire.ApplyTowerAlgorithms(&cfg.Config)
	mut(cfg)
	cfg.AddHostKey(signer)
	l := listen(t)
	up := websocket.Upgrader{}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		conn, chans, reqs, err := ssh.NewServerConn(wire.NewWSConn(ws), cfg)
		if err != nil {
			t.Logf("fake proxy handshake: %v", err)
			ws.Close()
			return
		}
		go func() {
			for nc := range chans {
				nc.Reject(ssh.Prohibited, "no")
			}
		}()
		for req := range reqs {
			req.Reply(true, nil)
		}
		conn.Close()
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "http://" + l.Addr().String()
}

// The agent speaks each Tower algorithm on its own, incl. ssh-rsa host keys.
func TestAgentAlgorithms(t *testing.T) {
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	connect := func(name, url string) {
		var fp string
		s, err := agent.Connect(agent.Options{
			ProxyServer: url, Name: "x", Token: "y", TowerAlgorithms: true,
			Log: func(f string, a ...any) { fp += fmt.Sprintf(f, a...) },
		})
		if err != nil {
			t.Errorf("%s: %v", name, err)
			return
		}
		s.Close()
		if !strings.Contains(fp, "SHA256:") {
			t.Errorf("%s: no fingerprint logged: %q", name, fp)
		}
	}
	for _, k := range wire.TowerKeyExchanges {
		connect("kex "+k, fakeProxy(t, ecKey, func(c *ssh.ServerConfig) { c.KeyExchanges = []string{k} }))
	}
	for _, k := range wire.TowerCiphers {
		connect("cipher "+k, fakeProxy(t, ecKey, func(c *ssh.ServerConfig) { c.Ciphers = []string{k} }))
	}
	for _, m := range wire.TowerMACs {
		connect("mac "+m, fakeProxy(t, ecKey, func(c *ssh.ServerConfig) {
			c.Ciphers = []string{"aes128-ctr"}
			c.MACs = []string{m}
		}))
	}
	connect("host key ed25519", fakeProxy(t, edKey, func(*ssh.ServerConfig) {}))
	connect("host key ssh-rsa", fakeProxy(t, rsaKey, func(*ssh.ServerConfig) {}))
}
