// go-proxy is a Go Tower (v0.2.1) wire-compatible proxy used as a test and
// benchmark peer.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
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
	)
	flag.StringVar(&listen, "listen", "127.0.0.1:8080", "HTTP/websocket listen address")
	flag.StringVar(&opts.Name, "name", "", "accepted agent name")
	flag.StringVar(&opts.Token, "token", "", "accepted agent token")
	flag.StringVar(&forward, "forward", "127.0.0.1:0", "TCP listen address forwarded through the agent")
	flag.StringVar(&opts.Target, "target", "", "channel target host:port (default: the agent's KubernetesSvcHost)")
	flag.BoolVar(&opts.TowerAlgorithms, "tower-v021-algos", true, "restrict SSH algorithms to Go Tower v0.2.1's")
	flag.StringVar(&tlsCert, "tls-cert", "", "serve wss:// with this certificate (PEM) ...")
	flag.StringVar(&tlsKey, "tls-key", "", "... and this key")
	flag.Parse()

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
