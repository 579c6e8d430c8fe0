// go-agent is a Go Tower (v0.2.1) wire-compatible agent used as a test and
// benchmark peer. It connects once; when the connection dies it exits 1,
// unless --reconnect is given: then it dials again the way Go Tower's agent
// does (its connectionLoop), see reconnect.go.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/kubesphere-rs/tower/tests/go-peers/agent"
)

func main() {
	var (
		opts       agent.Options
		caFile     string
		certFile   string
		keyFile    string
		bearer     string
		wsCAFile   string
		wsInsecure bool
		reconnect  bool
		maxRetry   time.Duration
	)
	flag.StringVar(&opts.ProxyServer, "proxy-server", "http://127.0.0.1:8080", "proxy URL (http:// -> ws://, https:// -> wss://)")
	flag.StringVar(&opts.Name, "name", "", "cluster name")
	flag.StringVar(&opts.Token, "token", "", "agent token")
	flag.StringVar(&opts.KubernetesService, "kubernetes-service", "kubernetes.default.svc:443", "KubernetesSvcHost (host:port)")
	flag.StringVar(&opts.KubeSphereService, "kubesphere-service", "ks-apiserver.kubesphere-system.svc:80", "KubeSphereSvcHost (host:port)")
	flag.DurationVar(&opts.Keepalive, "keepalive", 30*time.Second, "interval of `ping` global requests (0: off)")
	flag.StringVar(&caFile, "ca-data-file", "", "file whose content is sent as CAData")
	flag.StringVar(&certFile, "cert-data-file", "", "file whose content is sent as CertData")
	flag.StringVar(&keyFile, "key-data-file", "", "file whose content is sent as KeyData")
	flag.StringVar(&bearer, "bearer-token", "", "sent as BearerToken")
	flag.BoolVar(&opts.TowerAlgorithms, "tower-v021-algos", true, "restrict SSH algorithms to Go Tower v0.2.1's")
	flag.StringVar(&opts.ExpectHostKey, "expect-host-key", "", "if set, require this SHA256:... host key fingerprint")
	flag.StringVar(&wsCAFile, "ws-ca-file", "", "PEM CA bundle to trust for wss://")
	flag.BoolVar(&wsInsecure, "ws-insecure", false, "skip TLS verification for wss://")
	flag.IntVar(&opts.WSBufferSize, "ws-buffer-size", 1024, "websocket read/write buffer size = outgoing frame size (Go Tower: 1024)")
	flag.BoolVar(&reconnect, "reconnect", false, "dial again when the connection fails or ends, like Go Tower's agent (default: exit 1)")
	flag.DurationVar(&maxRetry, "max-retry-interval", 2*time.Minute, "with --reconnect: the longest wait between attempts (Go Tower's flag)")
	flag.Parse()

	opts.Log = func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "go-agent: "+format+"\n", args...)
	}
	read := func(path string) []byte {
		if path == "" {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			fatal(err)
		}
		return b
	}
	opts.CAData = read(caFile)
	opts.CertData = read(certFile)
	opts.KeyData = read(keyFile)
	if bearer != "" {
		opts.BearerToken = []byte(bearer)
	}
	if wsCAFile != "" || wsInsecure {
		tc := &tls.Config{InsecureSkipVerify: wsInsecure}
		if wsCAFile != "" {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(read(wsCAFile)) {
				fatal(fmt.Errorf("no certificate in %s", wsCAFile))
			}
			tc.RootCAs = pool
		}
		opts.TLSConfig = tc
	}

	if reconnect {
		fatal(connectionLoop(opts, maxRetry))
	}
	s, err := agent.Connect(opts)
	if err != nil {
		if reason, ok := agent.IsRejected(err); ok {
			fmt.Fprintf(os.Stderr, "config rejected: %s\n", reason)
			os.Exit(1)
		}
		fatal(err)
	}
	fmt.Println("connected")
	err = s.Wait()
	fatal(fmt.Errorf("connection lost: %w", err))
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "go-agent: %v\n", err)
	os.Exit(1)
}
