// go-proxy is a Go Tower (v0.2.1) wire-compatible proxy used as a test and
// benchmark peer.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/crypto/ssh"

	"github.com/kubesphere-rs/tower/tests/go-peers/proxy"
)

var outMu sync.Mutex

func out(line string) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintln(os.Stdout, line) // os.Stdout is unbuffered: one write per line
}

func main() {
	var (
		opts    proxy.Options
		listen  string
		forward string
		tlsCert string
		tlsKey  string
		// Go Tower's clusters and flags (see proxy/front.go).
		front  = proxy.Front{Ports: map[string]int{}, Servers: map[string]string{}}
		caCert string
		caKey  string
		host   string
		port   int
	)
	opts.Clusters = map[string]string{}
	flag.StringVar(&listen, "listen", "127.0.0.1:8080", "HTTP/websocket listen address")
	flag.StringVar(&opts.Name, "name", "", "accepted agent name")
	flag.StringVar(&opts.Token, "token", "", "accepted agent token")
	flag.StringVar(&forward, "forward", "127.0.0.1:0", "TCP listen address forwarded through the agent")
	flag.StringVar(&opts.Target, "target", "", "channel target host:port (default: the agent's KubernetesSvcHost)")
	flag.BoolVar(&opts.TowerAlgorithms, "tower-v021-algos", true, "restrict SSH algorithms to Go Tower v0.2.1's")
	flag.StringVar(&tlsCert, "tls-cert", "", "serve wss:// with this certificate (PEM) ...")
	flag.StringVar(&tlsKey, "tls-key", "", "... and this key")
	flag.Func("cluster", "NAME=TOKEN[=PORT[=SERVER]], repeatable: an accepted agent; with PORT, Go Tower's kube-apiserver port for it (needs --ca-cert/--ca-key), SERVER the URL its kubeconfig names (the Cluster's kubernetesAPIEndpoint; default https://--cluster-host:PORT)", func(v string) error {
		parts := strings.SplitN(v, "=", 4)
		if len(parts) < 2 || parts[0] == "" || parts[1] == "" {
			return fmt.Errorf("want NAME=TOKEN[=PORT[=SERVER]], got %q", v)
		}
		opts.Clusters[parts[0]] = parts[1]
		if len(parts) >= 3 {
			p, err := strconv.Atoi(parts[2])
			if err != nil || p <= 0 || p > 65535 {
				return fmt.Errorf("bad port in %q", v)
			}
			front.Ports[parts[0]] = p
		}
		if len(parts) == 4 {
			front.Servers[parts[0]] = parts[3]
		}
		return nil
	})
	flag.StringVar(&caCert, "ca-cert", "", "Go Tower's --ca-cert: signs the cluster ports' certificates and the kubeconfigs")
	flag.StringVar(&caKey, "ca-key", "", "Go Tower's --ca-key")
	flag.StringVar(&host, "host", "", "Go Tower's --host: with --port, replaces --listen")
	flag.IntVar(&port, "port", 0, "Go Tower's --port (the agents' port)")
	flag.StringVar(&front.Host, "cluster-host", "127.0.0.1", "address the cluster ports bind and the kubeconfigs name")
	flag.StringVar(&front.KubeconfigDir, "kubeconfig-dir", "", "write Go Tower's kubeconfig <name>.kubeconfig here on each agent connect")
	flag.Parse()
	if port != 0 {
		if host == "" {
			host = "0.0.0.0"
		}
		listen = net.JoinHostPort(host, strconv.Itoa(port))
	}
	if len(front.Ports) > 0 {
		if caCert == "" || caKey == "" {
			fatal(fmt.Errorf("--cluster with a port needs --ca-cert and --ca-key"))
		}
		ca, err := proxy.LoadCA(caCert, caKey)
		if err != nil {
			fatal(err)
		}
		front.CA = ca
		front.Event = out
		front.Log = func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "go-proxy: "+format+"\n", args...)
		}
		opts.OnConnect = front.OnConnect
	}

	opts.Event = out
	opts.Log = func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "go-proxy: "+format+"\n", args...)
	}
	p, err := proxy.New(opts)
	if err != nil {
		fatal(err)
	}
	fmt.Fprintf(os.Stderr, "go-proxy: host key %s %s\n", p.HostKey.Type(), ssh.FingerprintSHA256(p.HostKey))

	hl, err := net.Listen("tcp", listen)
	if err != nil {
		fatal(err)
	}
	fl, err := net.Listen("tcp", forward)
	if err != nil {
		fatal(err)
	}
	out("listening " + hl.Addr().String())
	out("forward " + fl.Addr().String())

	errc := make(chan error, 2)
	go func() { errc <- p.Forward(fl) }()
	go func() {
		srv := &http.Server{Handler: p}
		if tlsCert != "" || tlsKey != "" {
			errc <- srv.ServeTLS(hl, tlsCert, tlsKey)
		} else {
			errc <- srv.Serve(hl)
		}
	}()
	fatal(<-errc)
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "go-proxy: %v\n", err)
	os.Exit(1)
}
