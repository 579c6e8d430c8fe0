//go:build tools

// Package tools pins Toxiproxy (Shopify's fault proxy) for tests/faults.rs:
// `make toxiproxy` builds bin/toxiproxy-server from this module.
package tools

import _ "github.com/Shopify/toxiproxy/v2/cmd/server"
