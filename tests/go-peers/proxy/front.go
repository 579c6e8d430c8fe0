package proxy

// Go Tower's per-cluster front: what Go Tower's proxy (pkg/proxy: handleWebsocket,
// NewHTTPProxy, certs.IssueKubeConfig) does for an authenticated agent, for
// migration tests. On connect it opens the cluster's kube-apiserver port:
// HTTPS with a serving certificate its CA signs, client certificates
// requested but never verified (Go Tower's flaw, kept), each request proxied
// through a `kubesphere` channel to the agent's KubernetesSvcHost over TLS
// trusting the agent's CAData, with its CertData/KeyData and BearerToken.
// It then issues the kubeconfig Go Tower writes into the Cluster: the CA and
// a client certificate CN=kubernetes-admin, O=system:masters. The port closes
// when the session ends, as Go Tower's does.

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/kubesphere-rs/tower/tests/go-peers/wire"
)

// CA is Go Tower's --ca-cert / --ca-key.
type CA struct {
	Cert    *x509.Certificate
	CertPEM []byte
	Key     crypto.Signer
}

// LoadCA reads a PEM certificate and its key (PKCS#1 RSA as Go Tower wants;
// PKCS#8 and SEC1 are accepted too).
func LoadCA(certFile, keyFile string) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM certificate", certFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, fmt.Errorf("%s: no PEM key", keyFile)
	}
	var key any
	if key, err = x509.ParsePKCS1PrivateKey(kb.Bytes); err != nil {
		if key, err = x509.ParsePKCS8PrivateKey(kb.Bytes); err != nil {
			if key, err = x509.ParseECPrivateKey(kb.Bytes); err != nil {
				return nil, fmt.Errorf("%s: unsupported key", keyFile)
			}
		}
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: not a signing key", keyFile)
	}
	return &CA{Cert: cert, CertPEM: certPEM, Key: signer}, nil
}

// issue signs a fresh RSA 2048 key (as Go Tower's certutil does).
func (ca *CA) issue(tmpl *x509.Certificate) (certPEM, keyPEM []byte, err error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Minute)
	tmpl.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	return certPEM, keyPEM, nil
}

// Front serves Go Tower's per-cluster ports.
type Front struct {
	CA *CA
	// Host the cluster ports bind and the kubeconfigs name.
	Host string
	// Ports: cluster name -> kube-apiserver port.
	Ports map[string]int
	// Servers: cluster name -> the URL its kubeconfig names (Go Tower: the
	// Cluster's kubernetesAPIEndpoint, https://<mc-NAME's ClusterIP>:6443);
	// default https://Host:port. Its host joins the serving certificate.
	Servers map[string]string
	// KubeconfigDir gets <name>.kubeconfig on each connect.
	KubeconfigDir string
	Event         func(line string)
	Log           func(format string, args ...any)
}

// OnConnect is Proxy's Options.OnConnect.
func (f *Front) OnConnect(conn *ssh.ServerConn, cfg wire.AgentConfig) (func(), error) {
	port, ok := f.Ports[cfg.Name]
	if !ok {
		return func() {}, nil // a cluster with no port: tunnel only
	}
	server := f.Servers[cfg.Name]
	if server == "" {
		server = "https://" + net.JoinHostPort(f.Host, strconv.Itoa(port))
	}
	u, err := url.Parse(server)
	if err != nil {
		return nil, fmt.Errorf("server %q of %s: %w", server, cfg.Name, err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "Tower", Organization: []string{"KubeSphere"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc"},
	}
	if ip := net.ParseIP(u.Hostname()); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = append(tmpl.DNSNames, u.Hostname())
	}
	serverCert, serverKey, err := f.CA.issue(tmpl)
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(serverCert, serverKey)
	if err != nil {
		return nil, err
	}
	upstream, err := f.upstream(conn, cfg)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", net.JoinHostPort(f.Host, strconv.Itoa(port)))
	if err != nil {
		return nil, err
	}
	srv := &http.Server{
		Handler: upstream,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{pair},
			// Go Tower asks for a client certificate and never checks it.
			ClientAuth: tls.RequestClientCert,
		},
	}
	go srv.ServeTLS(l, "", "")

	if f.KubeconfigDir != "" {
		path, err := f.writeKubeconfig(cfg.Name, server)
		if err != nil {
			srv.Close()
			return nil, err
		}
		f.Event(fmt.Sprintf("kubeconfig %s %s", cfg.Name, path))
	}
	return func() { srv.Close() }, nil
}

// upstream proxies to the agent's kube-apiserver through the tunnel.
func (f *Front) upstream(conn *ssh.ServerConn, cfg wire.AgentConfig) (http.Handler, error) {
	target := cfg.KubernetesSvcHost
	host, _, err := net.SplitHostPort(target)
	if err != nil {
		return nil, fmt.Errorf("KubernetesSvcHost %q: %w", target, err)
	}
	tc := &tls.Config{ServerName: host}
	if len(cfg.CAData) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(cfg.CAData) {
			return nil, errors.New("no certificate in CAData")
		}
		tc.RootCAs = pool
	}
	if len(cfg.CertData) > 0 {
		pair, err := tls.X509KeyPair(cfg.CertData, cfg.KeyData)
		if err != nil {
			return nil, fmt.Errorf("CertData/KeyData: %w", err)
		}
		tc.Certificates = []tls.Certificate{pair}
	}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			ch, reqs, err := conn.OpenChannel(wire.ChannelType, []byte(target))
			if err != nil {
				return nil, err
			}
			go ssh.DiscardRequests(reqs)
			return &channelConn{Channel: ch, local: conn.LocalAddr(), remote: conn.RemoteAddr()}, nil
		},
		TLSClientConfig:     tc,
		MaxIdleConnsPerHost: 2,
	}
	bearer := string(cfg.BearerToken)
	return &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.Out.URL.Scheme = "https"
			r.Out.URL.Host = target
			r.Out.Host = target
			if bearer != "" {
				r.Out.Header.Set("Authorization", "Bearer "+bearer)
			}
		},
		Transport:     transport,
		FlushInterval: -1,
		ErrorLog:      nil,
	}, nil
}

// writeKubeconfig writes Go Tower's kubeconfig for cluster name.
func (f *Front) writeKubeconfig(name, server string) (string, error) {
	cert, key, err := f.CA.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "kubernetes-admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return "", err
	}
	b64 := base64.StdEncoding.EncodeToString
	text := fmt.Sprintf(`apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: %s
    server: %s
  name: %s
contexts:
- context:
    cluster: %s
    user: kubernetes-admin
  name: kubernetes-admin@%s
current-context: kubernetes-admin@%s
kind: Config
preferences: {}
users:
- name: kubernetes-admin
  user:
    client-certificate-data: %s
    client-key-data: %s
`, b64(f.CA.CertPEM), server, name, name, name, name, b64(cert), b64(key))
	path := filepath.Join(f.KubeconfigDir, name+".kubeconfig")
	if err := os.WriteFile(path+".tmp", []byte(text), 0o600); err != nil {
		return "", err
	}
	return path, os.Rename(path+".tmp", path)
}

// channelConn is an SSH channel as a net.Conn (no deadlines).
type channelConn struct {
	ssh.Channel
	local, remote net.Addr
}

func (c *channelConn) LocalAddr() net.Addr              { return c.local }
func (c *channelConn) RemoteAddr() net.Addr             { return c.remote }
func (c *channelConn) SetDeadline(time.Time) error      { return nil }
func (c *channelConn) SetReadDeadline(time.Time) error  { return nil }
func (c *channelConn) SetWriteDeadline(time.Time) error { return nil }
