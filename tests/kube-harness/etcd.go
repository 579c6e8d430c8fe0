package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// etcdServer is an embedded single-member etcd with its data in DIR/etcd,
// plain HTTP client and peer listeners on 127.0.0.1 and its log (level warn)
// in DIR/etcd.log.
type etcdServer struct {
	e          *embed.Etcd
	clientURL  string
	clientPort int
	peerPort   int
	disk       *slowDisk // unmounted once etcd stops; nil without --etcd-sync-delay-file
}

const etcdStartTimeout = 60 * time.Second

// startEtcd starts etcd on the given ports and waits until it serves.
func startEtcd(ctx context.Context, dir string, clientPort, peerPort int) (*etcdServer, error) {
	clientURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
	peerURL := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}

	cfg := embed.NewConfig()
	cfg.Name = "kube-harness"
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	// Only read when the data dir is new; a restarted member keeps its own
	// membership (a changed peer port does not matter to a single member).
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.InitialClusterToken = "kube-harness"
	cfg.Logger = "zap"
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(dir, "etcd.log")}
	// embed.NewConfig leaves this at 0 (only etcd's own flag parsing sets the
	// default), which logs every request as an expensive one at warn level.
	cfg.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	// The apiserver speaks gRPC; the JSON gateway is not needed.
	cfg.EnableGRPCGateway = false

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	timer := time.NewTimer(etcdStartTimeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd stopped while starting: %w", err)
	case <-timer.C:
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("etcd did not become ready within %s (see %s)", etcdStartTimeout, cfg.LogOutputs[0])
	case <-ctx.Done():
		e.Close()
		return nil, errors.New("interrupted while starting etcd")
	}
	return &etcdServer{e: e, clientURL: clientURL.String(), clientPort: clientPort, peerPort: peerPort}, nil
}

// Err reports a fatal error of the running etcd.
func (s *etcdServer) Err() <-chan error { return s.e.Err() }

// Close stops etcd, giving up waiting after timeout (the process is about to
// exit anyway; everything etcd acknowledged is already in its WAL).
func (s *etcdServer) Close(timeout time.Duration) {
	done := make(chan struct{})
	go func() {
		s.e.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		logf("etcd did not stop within %s; exiting anyway", timeout)
	}
	s.disk.Close()
}
