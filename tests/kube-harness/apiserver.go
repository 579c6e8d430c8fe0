package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"

	// The same side-effect imports as k8s.io/kubernetes/cmd/kube-apiserver.
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // load all the prometheus client-go plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	_ "time/tzdata"                                       // for timeZone support in CronJob
)

const (
	// serviceCIDR is the service cluster IP range; its first address is the
	// ClusterIP of the "kubernetes" service and is in the serving cert.
	serviceCIDR = "10.96.0.0/16"
	serviceIP   = "10.96.0.1"
	// saIssuer is the service-account token issuer (and default audience).
	saIssuer = "https://kubernetes.default.svc.cluster.local"

	readyTimeout = 180 * time.Second
)

// apiServer is kube-apiserver run in this process through the release
// binary's cobra command (k8s.io/kubernetes/cmd/kube-apiserver/app).
type apiServer struct {
	cmd  *cobra.Command
	port int
	done chan error // receives the command's result once
}

// newAPIServer builds the kube-apiserver command. It must be called once and
// early: app.NewAPIServerCommand installs the process-wide SIGINT/SIGTERM
// handler (genericapiserver.SetupSignalContext, which panics if called twice)
// and the returned command's Context() is cancelled on the first signal; the
// harness uses that context for its own start-up and shutdown as well.
func newAPIServer() *apiServer {
	return &apiServer{cmd: app.NewAPIServerCommand(), done: make(chan error, 1)}
}

// Context is cancelled on the first SIGINT or SIGTERM.
func (a *apiServer) Context() context.Context { return a.cmd.Context() }

// apiServerArgs are the kube-apiserver flags of the harness.
func apiServerArgs(p *pki, port int, etcdURL string) []string {
	return []string{
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + p.GeneratedDir(),
		"--tls-cert-file=" + p.ServingCert(),
		"--tls-private-key-file=" + p.ServingKey(),
		"--client-ca-file=" + p.CACert(),
		"--etcd-servers=" + etcdURL,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=" + saIssuer,
		"--service-account-key-file=" + p.SAPublicKey(),
		"--service-account-signing-key-file=" + p.SAPrivateKey(),
		"--service-cluster-ip-range=" + serviceCIDR,
		"--allow-privileged=true",
		// How the apiserver reaches kubelets (the --kubelet stand-in): the
		// Node's InternalIP, a serving cert from the harness CA, and a
		// client cert the stand-in accepts.
		"--kubelet-certificate-authority=" + p.CACert(),
		"--kubelet-client-certificate=" + p.KubeletClientCert(),
		"--kubelet-client-key=" + p.KubeletClientKey(),
		"--kubelet-preferred-address-types=InternalIP",
		// The lease reconciler would try to publish 127.0.0.1 as the endpoint
		// of the "kubernetes" service, which validation refuses (loopback).
		"--endpoint-reconciler-type=none",
		// The aggregation layer (APIService objects served by other
		// servers, e.g. the proxy's tower.kubesphere.io): the apiserver
		// vouches for its callers with the front-proxy client certificate
		// and X-Remote-* headers, and dials an APIService's endpoint
		// addresses itself (no kube-proxy here to route a ClusterIP).
		"--requestheader-client-ca-file=" + p.FrontProxyCACert(),
		"--requestheader-allowed-names=" + frontProxyClientName,
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + p.FrontProxyClientCert(),
		"--proxy-client-key-file=" + p.FrontProxyClientKey(),
		"--enable-aggregator-routing=true",
		"--profiling=false",
		"--logging-format=text",
		"--v=0",
	}
}

// Start runs the apiserver in the background; Done reports when it returns.
func (a *apiServer) Start(args []string) {
	a.cmd.SetArgs(args)
	// The command only prints usage or errors here; they go to the log.
	a.cmd.SetOut(os.Stderr)
	a.cmd.SetErr(os.Stderr)
	go func() {
		a.done <- cli.RunNoErrOutput(a.cmd)
	}()
}

func (a *apiServer) Done() <-chan error { return a.done }

// requestStop cancels the apiserver's signal context as a SIGTERM would
// (genericapiserver.RequestShutdown feeds the handler that
// app.NewAPIServerCommand installed).
func requestStop() { genericapiserver.RequestShutdown() }

// waitReady polls https://127.0.0.1:PORT/readyz with the admin certificate
// until it answers 200 "ok", the deadline passes, the apiserver or etcd stops,
// or the harness is told to stop.
func (a *apiServer) waitReady(ctx context.Context, p *pki, etcdErr <-chan error) error {
	client, err := adminHTTPClient(p)
	if err != nil {
		return err
	}
	url := "https://127.0.0.1:" + strconv.Itoa(a.port) + "/readyz"
	deadline := time.NewTimer(readyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	last := "no answer yet"
	for {
		select {
		case err := <-a.done:
			a.done <- err // leave it for the caller
			if err == nil {
				err = errors.New("exited without error")
			}
			return fmt.Errorf("kube-apiserver stopped before it was ready: %w", err)
		case err := <-etcdErr:
			return fmt.Errorf("etcd failed: %w", err)
		case <-ctx.Done():
			return errInterrupted
		case <-deadline.C:
			return fmt.Errorf("kube-apiserver was not ready within %s (last /readyz: %s)", readyTimeout, last)
		case <-tick.C:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err != nil {
			last = err.Error()
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && strings.TrimSpace(string(body)) == "ok" {
			return nil
		}
		last = fmt.Sprintf("%d %s", resp.StatusCode, lastLine(string(body)))
	}
}

var errInterrupted = errors.New("interrupted")

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func adminHTTPClient(p *pki) (*http.Client, error) {
	cert, err := tls.LoadX509KeyPair(p.AdminCert(), p.AdminKey())
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(p.caCert)
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			Proxy:             nil, // never through an HTTP(S)_PROXY
			DisableKeepAlives: true,
			TLSClientConfig: &tls.Config{
				RootCAs:      pool,
				Certificates: []tls.Certificate{cert},
				ServerName:   "127.0.0.1",
				MinVersion:   tls.VersionTLS12,
			},
		},
	}, nil
}

// writeKubeconfig writes the admin kubeconfig (CA, client cert and key
// embedded) to path through a temporary file and a rename.
func writeKubeconfig(path string, p *pki, port int) error {
	caPEM, err := os.ReadFile(p.CACert())
	if err != nil {
		return err
	}
	certPEM, err := os.ReadFile(p.AdminCert())
	if err != nil {
		return err
	}
	keyPEM, err := os.ReadFile(p.AdminKey())
	if err != nil {
		return err
	}
	const name = "kube-harness"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{
		Server:                   "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		CertificateAuthorityData: caPEM,
	}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: certPEM,
		ClientKeyData:         keyPEM,
	}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: "admin", Namespace: "default"}
	cfg.CurrentContext = name
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, data, 0o600)
}
