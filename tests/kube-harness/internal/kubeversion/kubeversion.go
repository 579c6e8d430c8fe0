// Package kubeversion stamps the Kubernetes version into
// k8s.io/component-base/version, as the release build does with
// -ldflags "-X k8s.io/component-base/version.gitVersion=...".
//
// Without it the apiserver reports "v0.0.0-master+$Format:%H$", which kubectl
// cannot parse. The version is the one of the k8s.io/kubernetes module this
// binary was built with (from its build info), so that a plain `go build`
// gives the right answer with no linker flags.
//
// The package has to be imported by package main: it is initialised before
// any k8s.io/... package that reads the version at init time (Go initialises
// packages in import-path order once their imports are done, and this one
// imports only k8s.io/component-base/version).
package kubeversion

import (
	"runtime/debug"
	"strings"
	_ "unsafe" // for go:linkname

	"k8s.io/component-base/version"
)

//go:linkname gitVersion k8s.io/component-base/version.gitVersion
var gitVersion string

//go:linkname gitMajor k8s.io/component-base/version.gitMajor
var gitMajor string

//go:linkname gitMinor k8s.io/component-base/version.gitMinor
var gitMinor string

//go:linkname gitCommit k8s.io/component-base/version.gitCommit
var gitCommit string

//go:linkname gitTreeState k8s.io/component-base/version.gitTreeState
var gitTreeState string

// Version is the k8s.io/kubernetes module version linked in, or "" if the
// build info does not tell.
var Version string

func init() {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return
	}
	for _, dep := range info.Deps {
		if dep.Path != "k8s.io/kubernetes" {
			continue
		}
		v := dep.Version
		if dep.Replace != nil {
			v = dep.Replace.Version
		}
		parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
		if len(parts) < 2 {
			return
		}
		Version = v
		gitVersion = v
		gitMajor, gitMinor = parts[0], parts[1]
		gitCommit = ""
		gitTreeState = "clean"
		// version.Get() reads a copy of gitVersion taken at its init.
		_ = version.SetDynamicVersion(v)
		return
	}
}
