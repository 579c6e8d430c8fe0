//go:build tools

// Package helmtool pins Helm, which `make helm` builds from this module
// (`go build helm.sh/helm/v4/cmd/helm`) into bin/helm for tests/helm.rs.
package helmtool

import _ "helm.sh/helm/v4/cmd/helm"
