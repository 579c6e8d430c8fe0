//go:build tools

// Package benchtools pins Chisel, which `make bench` builds from this module
// (`go install github.com/jpillora/chisel`) into target/bench/gobin.
package benchtools

import _ "github.com/jpillora/chisel"
