//go:build tools

// Package benchtools pins frp, whose frps and frpc `make bench` builds from
// this module into target/bench/gobin.
package benchtools

import (
	_ "github.com/fatedier/frp/cmd/frpc"
	_ "github.com/fatedier/frp/cmd/frps"
)
