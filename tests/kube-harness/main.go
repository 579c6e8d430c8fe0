// Command kube-harness runs a real kube-apiserver (k8s.io/kubernetes) with an
// embedded etcd on loopback, for tests and demos.
//
//	kube-harness --dir DIR [--port N] [--kubelet] [--egress-selector-config-file FILE]
//
// It prints exactly one line, "ready DIR/kubeconfig", on stdout once /readyz
// answers ok, and stops (exit 0) on SIGTERM or SIGINT. See README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kubesphere-rs/tower/tests/kube-harness/internal/kubeversion"
)

const (
	// How long the apiserver gets to shut down after SIGTERM/SIGINT before the
	// harness stops etcd and exits anyway, and how long etcd gets.
	apiServerStopTimeout = 5 * time.Second
	etcdStopTimeout      = 3 * time.Second
)

// The process' real stdout and stderr. File descriptors 1 and 2 are pointed
// at DIR/apiserver.log once DIR is known, so that nothing the apiserver, etcd,
// klog, gRPC or the Go runtime prints reaches the terminal or the "ready"
// protocol on stdout.
var (
	realStdout = os.Stdout
	realStderr = os.Stderr
)

// logf writes a harness message to the log (DIR/apiserver.log once set up).
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kube-harness: "+format+"\n", args...)
}

// fail reports err on the real stderr (and in the log) and returns exit code 1.
func fail(err error) int {
	msg := fmt.Sprintf("kube-harness: %v\n", err)
	if os.Stderr != realStderr {
		fmt.Fprint(os.Stderr, msg)
	}
	fmt.Fprint(realStderr, msg)
	return 1
}

func main() { os.Exit(run()) }

type options struct {
	dir     string
	port    int
	kubelet bool
	// Passed to kube-apiserver as is: how it reaches kubelets and the like
	// (e.g. HTTPConnect over a Unix socket, through a tunnel).
	egressSelectorConfig string
	// etcd's data directory on a FUSE pass-through whose syncs wait for the
	// duration in this file (slowdisk.go).
	etcdSyncDelayFile string
}

const usage = "usage: kube-harness --dir DIR [--port N] [--kubelet] [--egress-selector-config-file FILE] [--etcd-sync-delay-file FILE]"

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("kube-harness", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // run prints the error and the usage once
	fs.StringVar(&o.dir, "dir", "", "state directory: PKI, etcd data, logs and the kubeconfig (required)")
	fs.IntVar(&o.port, "port", 0, "apiserver port on 127.0.0.1; 0 reuses the port of the last run if free, else picks a free one")
	fs.BoolVar(&o.kubelet, "kubelet", false, "also run a kubelet stand-in: Node "+nodeName+" whose pods' containers are local processes (exec, attach, port-forward, logs)")
	fs.StringVar(&o.egressSelectorConfig, "egress-selector-config-file", "", "kube-apiserver's EgressSelectorConfiguration file, passed through")
	fs.StringVar(&o.etcdSyncDelayFile, "etcd-sync-delay-file", "", "put etcd's data on a FUSE pass-through whose fsync/fdatasync first wait for the duration written in FILE (e.g. 1s; missing or empty: no wait), read on every sync: a slow disk, made slow while running (needs root and /dev/fuse)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(realStderr, usage)
			fs.SetOutput(realStderr)
			fs.PrintDefaults()
		}
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if o.dir == "" {
		return o, errors.New("--dir is required")
	}
	if o.port < 0 || o.port > 65535 {
		return o, fmt.Errorf("--port %d out of range", o.port)
	}
	return o, nil
}

func run() int {
	o, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(realStderr, "kube-harness: %v\n%s (--help for the flags)\n", err, usage)
		return 2
	}
	kubeconfigOut := filepath.Join(o.dir, "kubeconfig") // as printed: DIR as given
	dir, err := filepath.Abs(o.dir)
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail(err)
	}

	// One harness per DIR.
	unlock, err := lockDir(dir)
	if err != nil {
		return fail(err)
	}
	defer unlock()

	logPath := filepath.Join(dir, "apiserver.log")
	if err := redirectOutput(logPath); err != nil {
		return fail(err)
	}
	logf("starting Kubernetes %s in %s (pid %d)", kubeversion.Version, dir, os.Getpid())

	// Build the apiserver command first: it installs the only SIGINT/SIGTERM
	// handler of the process, and its context is the harness' stop signal.
	api := newAPIServer()
	ctx := api.Context()

	// A kubeconfig left by an earlier run must not look like readiness.
	kubeconfig := filepath.Join(dir, "kubeconfig")
	_ = os.Remove(kubeconfig)

	p, err := ensurePKI(filepath.Join(dir, "pki"), net.ParseIP(serviceIP))
	if err != nil {
		return fail(fmt.Errorf("PKI: %w", err))
	}

	st := loadState(dir)
	port, err := choosePort(o.port, st.Port)
	if err != nil {
		return fail(err)
	}
	api.port = port

	var disk *slowDisk
	if o.etcdSyncDelayFile != "" {
		control, err := filepath.Abs(o.etcdSyncDelayFile)
		if err != nil {
			return fail(err)
		}
		disk, err = mountSlowDisk(filepath.Join(dir, "etcd.disk"), filepath.Join(dir, "etcd"), control)
		if err != nil {
			return fail(fmt.Errorf("--etcd-sync-delay-file: %w", err))
		}
		logf("etcd data on a FUSE pass-through at %s; sync delay read from %s", filepath.Join(dir, "etcd"), control)
	}
	etcd, err := startEtcdOnFreePorts(ctx, dir, st, port)
	if err != nil {
		disk.Close()
		if errors.Is(err, errInterrupted) {
			return 0
		}
		return fail(fmt.Errorf("etcd: %w (see %s)", err, filepath.Join(dir, "etcd.log")))
	}
	etcd.disk = disk
	kubeletPort := 0
	if o.kubelet {
		if kubeletPort, err = choosePort(0, st.KubeletPort); err != nil {
			etcd.Close(etcdStopTimeout)
			return fail(fmt.Errorf("kubelet port: %w", err))
		}
	}
	st = state{Port: port, EtcdClientPort: etcd.clientPort, EtcdPeerPort: etcd.peerPort, KubeletPort: kubeletPort}
	if err := saveState(dir, st); err != nil {
		logf("saving %s: %v", statePath(dir), err)
	}
	logf("etcd serving on %s; starting kube-apiserver on 127.0.0.1:%d", etcd.clientURL, port)

	args := apiServerArgs(p, port, etcd.clientURL)
	if o.egressSelectorConfig != "" {
		args = append(args, "--egress-selector-config-file="+o.egressSelectorConfig)
	}
	api.Start(args)

	if err := api.waitReady(ctx, p, etcd.Err()); err != nil {
		if errors.Is(err, errInterrupted) {
			return shutdown(api, etcd, 0)
		}
		code := fail(fmt.Errorf("%w (see %s)", err, logPath))
		requestStop()
		return shutdown(api, etcd, code)
	}
	if o.kubelet {
		if _, err := startKubelet(ctx, filepath.Join(dir, "kubelet"), p, port, kubeletPort); err != nil {
			if errors.Is(err, errInterrupted) || ctx.Err() != nil {
				return shutdown(api, etcd, 0)
			}
			code := fail(fmt.Errorf("kubelet stand-in: %w (see %s)", err, logPath))
			requestStop()
			return shutdown(api, etcd, code)
		}
	}
	if err := writeKubeconfig(kubeconfig, p, port); err != nil {
		code := fail(fmt.Errorf("writing %s: %w", kubeconfig, err))
		requestStop()
		return shutdown(api, etcd, code)
	}
	logf("ready: %s", kubeconfig)
	fmt.Fprintf(realStdout, "ready %s\n", kubeconfigOut)

	select {
	case <-ctx.Done():
		logf("signal received, stopping")
		return shutdown(api, etcd, 0)
	case err := <-api.Done():
		if err == nil {
			err = errors.New("exited without error")
		}
		code := fail(fmt.Errorf("kube-apiserver stopped: %w (see %s)", err, logPath))
		etcd.Close(etcdStopTimeout)
		return code
	case err := <-etcd.Err():
		code := fail(fmt.Errorf("etcd failed: %w", err))
		requestStop()
		return shutdown(api, etcd, code)
	}
}

// shutdown waits (bounded) for the apiserver, whose context is already
// cancelled, then stops etcd.
func shutdown(api *apiServer, etcd *etcdServer, code int) int {
	select {
	case err := <-api.Done():
		if err != nil {
			logf("kube-apiserver: %v", err)
		}
	case <-time.After(apiServerStopTimeout):
		logf("kube-apiserver did not stop within %s; exiting anyway", apiServerStopTimeout)
	}
	etcd.Close(etcdStopTimeout)
	logf("stopped")
	return code
}

// startEtcdOnFreePorts starts etcd on the ports of the last run if both are
// free, else on new free ports (retrying if another process takes a port
// between the check and etcd's bind). It never takes apiPort: that one is
// chosen but not yet bound, so the kernel may hand it out again.
func startEtcdOnFreePorts(ctx context.Context, dir string, st state, apiPort int) (*etcdServer, error) {
	client, peer := st.EtcdClientPort, st.EtcdPeerPort
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		clash := client == peer || client == apiPort || peer == apiPort
		if attempt > 0 || client == 0 || peer == 0 || !portFree(client) || !portFree(peer) || clash {
			var err error
			if client, err = freePort(); err != nil {
				return nil, err
			}
			if peer, err = freePort(); err != nil {
				return nil, err
			}
			if client == peer || client == apiPort || peer == apiPort {
				lastErr = fmt.Errorf("the kernel handed out port %d/%d twice", client, peer)
				continue
			}
		}
		e, err := startEtcd(ctx, dir, client, peer)
		if err == nil {
			return e, nil
		}
		if ctx.Err() != nil {
			return nil, errInterrupted
		}
		lastErr = err
		logf("etcd on ports %d/%d: %v", client, peer, err)
	}
	return nil, lastErr
}

// choosePort returns the apiserver port: the one asked for (which must be
// free), else the last run's if free, else a free one.
func choosePort(asked, last int) (int, error) {
	if asked != 0 {
		if err := checkPort(asked); err != nil {
			return 0, fmt.Errorf("--port %d: 127.0.0.1:%d is not available: %w", asked, asked, err)
		}
		return asked, nil
	}
	if last != 0 && portFree(last) {
		return last, nil
	}
	return freePort()
}

func checkPort(port int) error {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return err
	}
	return l.Close()
}

func portFree(port int) bool { return checkPort(port) == nil }

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// state is what a run leaves in DIR/state.json for the next one.
type state struct {
	Port           int `json:"port"`
	EtcdClientPort int `json:"etcdClientPort"`
	EtcdPeerPort   int `json:"etcdPeerPort"`
	KubeletPort    int `json:"kubeletPort,omitempty"`
}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

func loadState(dir string) state {
	var st state
	if data, err := os.ReadFile(statePath(dir)); err == nil {
		_ = json.Unmarshal(data, &st)
	}
	return st
}

func saveState(dir string, st state) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(statePath(dir), append(data, '\n'), 0o644)
}

// lockDir takes an exclusive flock on DIR/lock for the life of the process.
func lockDir(dir string) (func(), error) {
	path := filepath.Join(dir, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s is in use by another kube-harness", dir)
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	return func() { f.Close() }, nil
}

// redirectOutput keeps the real stdout/stderr on new descriptors and points
// descriptors 1 and 2 at the log file. Go runtime crash output is copied to
// the real stderr.
func redirectOutput(logPath string) error {
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	out, err := unix.FcntlInt(1, unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return fmt.Errorf("dup stdout: %w", err)
	}
	errFd, err := unix.FcntlInt(2, unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return fmt.Errorf("dup stderr: %w", err)
	}
	if err := unix.Dup3(int(logFile.Fd()), 1, 0); err != nil {
		return fmt.Errorf("redirect stdout: %w", err)
	}
	if err := unix.Dup3(int(logFile.Fd()), 2, 0); err != nil {
		return fmt.Errorf("redirect stderr: %w", err)
	}
	realStdout = os.NewFile(uintptr(out), "stdout")
	realStderr = os.NewFile(uintptr(errFd), "stderr")
	_ = debug.SetCrashOutput(realStderr, debug.CrashOptions{})
	return nil
}
