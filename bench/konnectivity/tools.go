//go:build tools

// Package benchtools pins apiserver-network-proxy (konnectivity), whose
// proxy-server and proxy-agent `make bench` builds from this module into
// target/bench/gobin. It has a module of its own: it brings Kubernetes'
// libraries, which Chisel's module need not share.
package benchtools

import (
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/agent"
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/server"
)
