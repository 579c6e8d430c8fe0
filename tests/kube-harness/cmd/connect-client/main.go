// connect-client is excalibur's "case 2" as its users write it: a client-go
// program that reaches a member's kube-apiserver through the proxy's HTTP
// CONNECT door by giving client-go a dialer. Every connection client-go
// opens goes to the door (the mutual-TLS port, or a cluster's Unix socket),
// asks for `CONNECT <authority>`, and then carries client-go's own TLS to
// the member, verified with the member's kubeconfig.
//
//	connect-client --kubeconfig member.kubeconfig --authority alpha:443 \
//	  --proxy 127.0.0.1:7443 --proxy-ca ca.crt --proxy-cert alpha.crt --proxy-key alpha.key
//	connect-client --kubeconfig member.kubeconfig --authority alpha:443 --proxy-socket alpha.sock
//
// It lists the pods of --namespace, one name per line.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "the MEMBER's kubeconfig (its CA and credentials)")
	authority := flag.String("authority", "", "what to CONNECT to, e.g. alpha:443 for member alpha's kube-apiserver")
	proxyAddr := flag.String("proxy", "", "the proxy's CONNECT port, host:port (mutual TLS)")
	proxyCA := flag.String("proxy-ca", "", "the proxy CA (verifies the CONNECT port)")
	proxyCert := flag.String("proxy-cert", "", "client certificate for the CONNECT port")
	proxyKey := flag.String("proxy-key", "", "its key")
	socket := flag.String("proxy-socket", "", "a cluster's Unix socket instead of --proxy")
	namespace := flag.String("namespace", "default", "whose pods to list")
	flag.Parse()
	if *kubeconfig == "" || *authority == "" || (*proxyAddr == "") == (*socket == "") {
		fail("give --kubeconfig, --authority and one of --proxy or --proxy-socket")
	}

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fail("--kubeconfig: %v", err)
	}
	var door func(ctx context.Context) (net.Conn, error)
	if *socket != "" {
		door = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", *socket)
		}
	} else {
		tlsConfig, err := doorTLS(*proxyCA, *proxyCert, *proxyKey)
		if err != nil {
			fail("the CONNECT port's TLS: %v", err)
		}
		door = func(ctx context.Context) (net.Conn, error) {
			d := tls.Dialer{Config: tlsConfig}
			return d.DialContext(ctx, "tcp", *proxyAddr)
		}
	}
	// client-go dials the kubeconfig's server address; every such dial
	// becomes a CONNECT through the door. TLS to the member stays
	// client-go's, end to end.
	config.Dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
		conn, err := door(ctx)
		if err != nil {
			return nil, err
		}
		if err := connect(conn, *authority); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}
	config.Timeout = 30 * time.Second
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		fail("client: %v", err)
	}
	pods, err := client.CoreV1().Pods(*namespace).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		fail("listing pods: %v", err)
	}
	for _, pod := range pods.Items {
		fmt.Println(pod.Name)
	}
}

func doorTLS(ca, cert, key string) (*tls.Config, error) {
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no certificate", ca)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}}, nil
}

// connect sends `CONNECT authority` and reads the answer; anything but 200
// is an error carrying the proxy's one-line reason.
func connect(conn net.Conn, authority string) error {
	if _, err := fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", authority, authority); err != nil {
		return err
	}
	// A bufio.Reader may read past the head; the door sends nothing after a
	// 200 until the member speaks, and client-go speaks first (TLS), so the
	// buffer holds only the head.
	reader := bufio.NewReader(conn)
	resp, err := http.ReadResponse(reader, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return fmt.Errorf("CONNECT %s: %v", authority, err)
	}
	if resp.StatusCode != http.StatusOK {
		body := make([]byte, 512)
		n, _ := resp.Body.Read(body)
		return fmt.Errorf("CONNECT %s: %s: %s", authority, resp.Status, strings.TrimSpace(string(body[:n])))
	}
	if reader.Buffered() > 0 {
		return fmt.Errorf("CONNECT %s: unexpected bytes after the answer", authority)
	}
	return nil
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "connect-client: "+format+"\n", args...)
	os.Exit(1)
}
