package main

// The kubelet stand-in (--kubelet): one Node whose "containers" are local
// processes, served by the real kubelet streaming stack.
//
// The kube-apiserver reaches a kubelet at the Node's InternalIP and
// status.daemonEndpoints.kubeletEndpoint.port over HTTPS and calls
//
//	/exec/{ns}/{pod}[/{uid}]/{container}?command=...   (SPDY upgrade)
//	/attach/{ns}/{pod}[/{uid}]/{container}              (SPDY upgrade)
//	/portForward/{ns}/{pod}[/{uid}]                     (SPDY upgrade)
//	/containerLogs/{ns}/{pod}/{container}?follow=...    (plain GET, streamed)
//
// The stand-in serves those paths the way the real kubelet does
// (k8s.io/kubernetes/pkg/kubelet/server/server.go): it asks the CRI streaming
// server (k8s.io/kubelet/pkg/cri/streaming, what containerd and CRI-O embed)
// for a one-time URL (GetExec/GetAttach/GetPortForward), then proxies the
// upgrade to it with apimachinery's UpgradeAwareHandler (the kubelet's
// proxyStream). The streaming server speaks SPDY/3.1 and the remotecommand
// and portforward protocols itself (library code, unchanged); only its
// streaming.Runtime is ours: os/exec for exec and attach, a TCP dial to
// 127.0.0.1 for port-forward.
//
// It also does the part of a kubelet's job the API needs: it registers the
// Node (Ready, kept Ready by a heartbeat), marks every Pod bound to it
// (spec.nodeName) Running with ready containers, finishes the graceful
// deletion of its pods, and writes a log file per container that grows by a
// line every 100 ms.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/proxy"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/remotecommand"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/kubelet/pkg/cri/streaming"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
	"k8s.io/utils/ptr"

	"github.com/kubesphere-rs/tower/tests/kube-harness/internal/kubeversion"
)

const (
	// nodeName is the Node the stand-in registers; pods with this
	// spec.nodeName are "run" by it.
	nodeName = "harness-node"
	// nodeIP is the Node's InternalIP: the apiserver dials the kubelet here.
	nodeIP = "127.0.0.1"

	heartbeatPeriod = 10 * time.Second
	logLinePeriod   = 100 * time.Millisecond
	// How long an exec'd process' output may keep flowing after it exited
	// (a background child holding stdout open) before its pipes are closed.
	execWaitDelay = 10 * time.Second
)

// kubelet is the stand-in. Its files live in dir (DIR/kubelet):
//
//	pods/NS/POD/CONTAINER/      the container's working directory (exec, cp)
//	pods/NS/POD/CONTAINER.log   the container's log (GET containerLogs)
type kubelet struct {
	dir    string
	port   int
	client kubernetes.Interface
	stream streaming.Server

	mu   sync.Mutex
	pods map[string]*corev1.Pod // "ns/name" -> pod, as last seen
	logs map[string]*logFile    // "ns/pod/container" -> log being appended to
}

type logFile struct {
	f     *os.File
	lines int
}

// startKubelet registers the Node, starts the kubelet's HTTPS port and its
// streaming server, and keeps the Node and its Pods up to date until ctx ends.
func startKubelet(ctx context.Context, dir string, p *pki, apiPort, kubeletPort int) (*kubelet, error) {
	cfg := &rest.Config{
		Host: "https://127.0.0.1:" + strconv.Itoa(apiPort),
		TLSClientConfig: rest.TLSClientConfig{
			CAFile:   p.CACert(),
			CertFile: p.AdminCert(),
			KeyFile:  p.AdminKey(),
		},
		UserAgent: "kube-harness-kubelet",
		QPS:       100,
		Burst:     200,
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	k := &kubelet{
		dir:    dir,
		port:   kubeletPort,
		client: client,
		pods:   map[string]*corev1.Pod{},
		logs:   map[string]*logFile{},
	}
	if err := os.MkdirAll(filepath.Join(dir, "pods"), 0o755); err != nil {
		return nil, err
	}

	// The CRI streaming server on a loopback port of its own, plain HTTP, as
	// containerd runs it; the kubelet port proxies to it.
	streamListener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	scfg := streaming.DefaultConfig
	scfg.Addr = streamListener.Addr().String()
	scfg.BaseURL = &url.URL{Scheme: "http", Host: scfg.Addr}
	k.stream, err = streaming.NewServer(scfg, &runtime{k: k})
	if err != nil {
		streamListener.Close()
		return nil, err
	}
	streamSrv := &http.Server{Handler: k.stream, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = streamSrv.Serve(streamListener) }()

	// The kubelet port: HTTPS with a certificate from the harness CA, and
	// only clients with a certificate from that CA (the apiserver's
	// --kubelet-client-certificate).
	cert, err := tls.LoadX509KeyPair(p.KubeletCert(), p.KubeletKey())
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(p.caCert)
	kubeletListener, err := net.Listen("tcp", net.JoinHostPort(nodeIP, strconv.Itoa(kubeletPort)))
	if err != nil {
		return nil, fmt.Errorf("kubelet port %d: %w", kubeletPort, err)
	}
	srv := &http.Server{
		Handler:           k.routes(),
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			MinVersion:   tls.VersionTLS12,
		},
		ErrorLog: nil,
	}
	go func() { _ = srv.ServeTLS(kubeletListener, "", "") }()
	go func() {
		<-ctx.Done()
		_ = srv.Close()
		_ = streamSrv.Close()
	}()

	if err := k.registerNode(ctx); err != nil {
		return nil, fmt.Errorf("registering Node %s: %w", nodeName, err)
	}
	go k.heartbeat(ctx)
	if err := k.watchPods(ctx); err != nil {
		return nil, fmt.Errorf("watching pods: %w", err)
	}
	go k.appendLogs(ctx)
	logf("kubelet stand-in: Node %s, kubelet https://%s:%d, streaming server %s",
		nodeName, nodeIP, kubeletPort, scfg.Addr)
	return k, nil
}

// ---------------------------------------------------------------------------
// Node

func (k *kubelet) nodeStatus(now metav1.Time) corev1.NodeStatus {
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse(strconv.Itoa(goruntime.NumCPU())),
		corev1.ResourceMemory: resource.MustParse("8Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg,
			LastHeartbeatTime: now, LastTransitionTime: now}
	}
	return corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "kube-harness kubelet stand-in is posting ready status"),
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: nodeIP},
			{Type: corev1.NodeHostName, Address: nodeName},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{
			KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(k.port)},
		},
		NodeInfo: corev1.NodeSystemInfo{
			MachineID:               "kube-harness",
			SystemUUID:              "kube-harness",
			BootID:                  "kube-harness",
			KernelVersion:           "kube-harness",
			OSImage:                 "kube-harness kubelet stand-in",
			ContainerRuntimeVersion: "harness://0.1",
			KubeletVersion:          kubeversion.Version,
			KubeProxyVersion:        kubeversion.Version,
			OperatingSystem:         goruntime.GOOS,
			Architecture:            goruntime.GOARCH,
		},
	}
}

func (k *kubelet) registerNode(ctx context.Context) error {
	nodes := k.client.CoreV1().Nodes()
	node, err := nodes.Get(ctx, nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err = nodes.Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name: nodeName,
				Labels: map[string]string{
					"kubernetes.io/hostname": nodeName,
					"kubernetes.io/os":       goruntime.GOOS,
					"kubernetes.io/arch":     goruntime.GOARCH,
				},
			},
		}, metav1.CreateOptions{})
	}
	if err != nil {
		return err
	}
	// No node lifecycle controller runs: the not-ready taint the admission
	// plugin adds at creation would stay. Nothing schedules here anyway, but
	// keep the Node looking like a healthy one.
	if len(node.Spec.Taints) > 0 {
		node.Spec.Taints = nil
		if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	node.Status = k.nodeStatus(metav1.Now())
	if _, err := nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return err
	}
	return k.renewLease(ctx)
}

func (k *kubelet) renewLease(ctx context.Context) error {
	leases := k.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, nodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: nodeName, Namespace: corev1.NamespaceNodeLease},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(nodeName),
				LeaseDurationSeconds: ptr.To[int32](40),
				RenewTime:            &now,
			},
		}, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

// heartbeat renews the Node lease and its Ready condition.
func (k *kubelet) heartbeat(ctx context.Context) {
	tick := time.NewTicker(heartbeatPeriod)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if err := k.renewLease(ctx); err != nil && ctx.Err() == nil {
			logf("kubelet stand-in: renewing the node lease: %v", err)
		}
		node, err := k.client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			if ctx.Err() == nil {
				logf("kubelet stand-in: reading Node: %v", err)
			}
			continue
		}
		now := metav1.Now()
		status := k.nodeStatus(now)
		// Keep the transition times of conditions that did not change.
		for i, c := range status.Conditions {
			for _, old := range node.Status.Conditions {
				if old.Type == c.Type && old.Status == c.Status {
					status.Conditions[i].LastTransitionTime = old.LastTransitionTime
				}
			}
		}
		node.Status = status
		if _, err := k.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil && ctx.Err() == nil {
			logf("kubelet stand-in: updating Node status: %v", err)
		}
	}
}

// ---------------------------------------------------------------------------
// Pods

// watchPods follows the pods bound to the Node (returns once the first list
// is in): new ones are marked Running, deleted ones forgotten, and graceful
// deletions finished (there are no containers to stop).
func (k *kubelet) watchPods(ctx context.Context) error {
	lw := cache.NewListWatchFromClient(k.client.CoreV1().RESTClient(), "pods", metav1.NamespaceAll,
		fields.OneTermEqualSelector("spec.nodeName", nodeName))
	_, informer := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &corev1.Pod{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { k.podChanged(ctx, obj) },
			UpdateFunc: func(_, obj any) { k.podChanged(ctx, obj) },
			DeleteFunc: func(obj any) {
				if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
					obj = d.Obj
				}
				if pod, ok := obj.(*corev1.Pod); ok {
					k.forget(pod)
				}
			},
		},
	})
	go informer.Run(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		return errInterrupted
	}
	return nil
}

func podKey(ns, name string) string { return ns + "/" + name }

func (k *kubelet) podChanged(ctx context.Context, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	key := podKey(pod.Namespace, pod.Name)
	if pod.DeletionTimestamp != nil {
		// What the kubelet does once the containers have stopped.
		k.forget(pod)
		err := k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: ptr.To[int64](0),
			Preconditions:      &metav1.Preconditions{UID: &pod.UID},
		})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && ctx.Err() == nil {
			logf("kubelet stand-in: deleting pod %s: %v", key, err)
		}
		return
	}
	k.mu.Lock()
	k.pods[key] = pod
	k.mu.Unlock()
	for _, c := range pod.Spec.Containers {
		if err := k.openContainer(pod, c.Name); err != nil {
			logf("kubelet stand-in: container %s/%s: %v", key, c.Name, err)
		}
	}
	if podIsRunning(pod) {
		return
	}
	now := metav1.Now()
	status := pod.Status.DeepCopy()
	status.Phase = corev1.PodRunning
	status.HostIP = nodeIP
	status.HostIPs = []corev1.HostIP{{IP: nodeIP}}
	status.PodIP = nodeIP
	status.PodIPs = []corev1.PodIP{{IP: nodeIP}}
	if status.StartTime == nil {
		status.StartTime = &now
	}
	status.Conditions = nil
	for _, t := range []corev1.PodConditionType{corev1.PodReadyToStartContainers, corev1.PodInitialized,
		corev1.PodReady, corev1.ContainersReady, corev1.PodScheduled} {
		status.Conditions = append(status.Conditions, corev1.PodCondition{
			Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now,
		})
	}
	status.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		status.ContainerStatuses = append(status.ContainerStatuses, corev1.ContainerStatus{
			Name:         c.Name,
			Ready:        true,
			Started:      ptr.To(true),
			Image:        c.Image,
			ImageID:      "harness://" + c.Image,
			ContainerID:  "harness://" + containerID(pod.Namespace, pod.Name, c.Name),
			State:        corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
			RestartCount: 0,
		})
	}
	updated := pod.DeepCopy()
	updated.Status = *status
	if _, err := k.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil &&
		!apierrors.IsConflict(err) && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		// A conflict means a newer version is on its way to podChanged.
		logf("kubelet stand-in: pod %s status: %v", key, err)
	}
}

func podIsRunning(pod *corev1.Pod) bool {
	if pod.Status.Phase != corev1.PodRunning || len(pod.Status.ContainerStatuses) != len(pod.Spec.Containers) {
		return false
	}
	for _, cs := range pod.Status.ContainerStatuses {
		if !cs.Ready {
			return false
		}
	}
	return true
}

func (k *kubelet) forget(pod *corev1.Pod) {
	key := podKey(pod.Namespace, pod.Name)
	k.mu.Lock()
	defer k.mu.Unlock()
	if cur, ok := k.pods[key]; ok && cur.UID == pod.UID {
		delete(k.pods, key)
	}
	prefix := key + "/"
	for id, lf := range k.logs {
		if strings.HasPrefix(id, prefix) {
			lf.f.Close()
			delete(k.logs, id)
		}
	}
}

// pod returns the pod ns/name if it is bound to this Node and not being
// deleted.
func (k *kubelet) pod(ns, name string) (*corev1.Pod, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	p, ok := k.pods[podKey(ns, name)]
	return p, ok
}

func containerID(ns, pod, container string) string { return ns + "/" + pod + "/" + container }

// containerDir is a container's working directory: exec runs there, so
// relative paths (kubectl cp pod:file) land there.
func (k *kubelet) containerDir(id string) string {
	return filepath.Join(k.dir, "pods", filepath.FromSlash(id))
}

func (k *kubelet) logPath(id string) string { return k.containerDir(id) + ".log" }

func (k *kubelet) openContainer(pod *corev1.Pod, container string) error {
	id := containerID(pod.Namespace, pod.Name, container)
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.logs[id]; ok {
		return nil
	}
	if err := os.MkdirAll(k.containerDir(id), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(k.logPath(id), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	k.logs[id] = &logFile{f: f}
	return nil
}

// appendLogs adds a line to every running container's log every 100 ms.
func (k *kubelet) appendLogs(ctx context.Context) {
	tick := time.NewTicker(logLinePeriod)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			k.mu.Lock()
			for _, lf := range k.logs {
				lf.f.Close()
			}
			k.logs = map[string]*logFile{}
			k.mu.Unlock()
			return
		case now := <-tick.C:
			k.mu.Lock()
			for id, lf := range k.logs {
				lf.lines++
				fmt.Fprintf(lf.f, "%s %s line %d\n", now.UTC().Format(time.RFC3339Nano), id, lf.lines)
			}
			k.mu.Unlock()
		}
	}
}

// ---------------------------------------------------------------------------
// The kubelet's HTTP API

func (k *kubelet) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	for _, p := range []string{"/exec/{ns}/{pod}/{container}", "/exec/{ns}/{pod}/{uid}/{container}"} {
		mux.HandleFunc(p, k.serveExec)
	}
	for _, p := range []string{"/attach/{ns}/{pod}/{container}", "/attach/{ns}/{pod}/{uid}/{container}"} {
		mux.HandleFunc(p, k.serveAttach)
	}
	for _, p := range []string{"/portForward/{ns}/{pod}", "/portForward/{ns}/{pod}/{uid}"} {
		mux.HandleFunc(p, k.servePortForward)
	}
	mux.HandleFunc("GET /containerLogs/{ns}/{pod}/{container}", k.serveLogs)
	return mux
}

// findContainer checks the request's pod (and uid, if given) and container,
// answering 404 as the kubelet does when one is unknown.
func (k *kubelet) findContainer(w http.ResponseWriter, r *http.Request, needContainer bool) (*corev1.Pod, bool) {
	ns, name, uid := r.PathValue("ns"), r.PathValue("pod"), r.PathValue("uid")
	pod, ok := k.pod(ns, name)
	if !ok || (uid != "" && string(pod.UID) != uid) {
		http.Error(w, "pod does not exist", http.StatusNotFound)
		return nil, false
	}
	if needContainer {
		c := r.PathValue("container")
		for _, spec := range pod.Spec.Containers {
			if spec.Name == c {
				return pod, true
			}
		}
		http.Error(w, fmt.Sprintf("container %q not found in pod %q", c, name), http.StatusNotFound)
		return nil, false
	}
	return pod, true
}

func (k *kubelet) serveExec(w http.ResponseWriter, r *http.Request) {
	opts, err := remotecommandserver.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pod, ok := k.findContainer(w, r, true)
	if !ok {
		return
	}
	resp, err := k.stream.GetExec(&runtimeapi.ExecRequest{
		ContainerId: containerID(pod.Namespace, pod.Name, r.PathValue("container")),
		Cmd:         r.URL.Query()["command"],
		Tty:         opts.TTY,
		Stdin:       opts.Stdin,
		Stdout:      opts.Stdout,
		Stderr:      opts.Stderr,
	})
	if err != nil {
		_ = streaming.WriteError(err, w)
		return
	}
	proxyStream(w, r, resp.Url)
}

func (k *kubelet) serveAttach(w http.ResponseWriter, r *http.Request) {
	opts, err := remotecommandserver.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	pod, ok := k.findContainer(w, r, true)
	if !ok {
		return
	}
	resp, err := k.stream.GetAttach(&runtimeapi.AttachRequest{
		ContainerId: containerID(pod.Namespace, pod.Name, r.PathValue("container")),
		Tty:         opts.TTY,
		Stdin:       opts.Stdin,
		Stdout:      opts.Stdout,
		Stderr:      opts.Stderr,
	})
	if err != nil {
		_ = streaming.WriteError(err, w)
		return
	}
	proxyStream(w, r, resp.Url)
}

func (k *kubelet) servePortForward(w http.ResponseWriter, r *http.Request) {
	pod, ok := k.findContainer(w, r, false)
	if !ok {
		return
	}
	// SPDY carries the ports per stream; the websocket form (which the
	// apiserver does not use towards kubelets) has them in the query.
	var ports []int32
	for _, v := range r.URL.Query()["port"] {
		for _, s := range strings.Split(v, ",") {
			n, err := strconv.ParseUint(s, 10, 16)
			if err != nil || n == 0 {
				http.Error(w, fmt.Sprintf("bad port %q", s), http.StatusBadRequest)
				return
			}
			ports = append(ports, int32(n))
		}
	}
	resp, err := k.stream.GetPortForward(&runtimeapi.PortForwardRequest{
		PodSandboxId: podKey(pod.Namespace, pod.Name),
		Port:         ports,
	})
	if err != nil {
		_ = streaming.WriteError(err, w)
		return
	}
	proxyStream(w, r, resp.Url)
}

type responder struct{}

func (responder) Error(w http.ResponseWriter, _ *http.Request, err error) {
	http.Error(w, err.Error(), http.StatusInternalServerError)
}

// proxyStream is the kubelet's: the upgrade goes to the streaming server.
func proxyStream(w http.ResponseWriter, r *http.Request, raw string) {
	u, err := url.Parse(raw)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	proxy.NewUpgradeAwareHandler(u, nil, false, true, responder{}).ServeHTTP(w, r)
}

// serveLogs serves a container's log file: tailLines and limitBytes are
// honoured, follow=true keeps the response open and sends what is appended
// until the client goes away or the pod is deleted.
func (k *kubelet) serveLogs(w http.ResponseWriter, r *http.Request) {
	pod, ok := k.findContainer(w, r, true)
	if !ok {
		return
	}
	id := containerID(pod.Namespace, pod.Name, r.PathValue("container"))
	q := r.URL.Query()
	follow := q.Get("follow") == "true" || q.Get("follow") == "1"
	var limit int64 = -1
	if v := q.Get("limitBytes"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			http.Error(w, "bad limitBytes", http.StatusBadRequest)
			return
		}
		limit = n
	}
	tail := int64(-1)
	if v := q.Get("tailLines"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bad tailLines", http.StatusBadRequest)
			return
		}
		tail = n
	}
	f, err := os.Open(k.logPath(id))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	defer f.Close()
	if tail >= 0 {
		if _, err := f.Seek(tailOffset(f, tail), io.SeekStart); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
	}
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	var out io.Writer = w
	var lw *io.LimitedReader
	buf := make([]byte, 32*1024)
	for {
		var src io.Reader = f
		if limit >= 0 {
			lw = &io.LimitedReader{R: f, N: limit}
			src = lw
		}
		n, err := io.CopyBuffer(out, src, buf)
		if limit >= 0 {
			limit -= n
			if limit <= 0 {
				return
			}
		}
		if err != nil {
			return // the client went away
		}
		if flusher != nil && n > 0 {
			flusher.Flush()
		}
		if !follow {
			return
		}
		if _, still := k.pod(pod.Namespace, pod.Name); !still {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// tailOffset is where the last n lines of f start.
func tailOffset(f *os.File, n int64) int64 {
	st, err := f.Stat()
	if err != nil || n == 0 {
		if err == nil {
			return st.Size()
		}
		return 0
	}
	size := st.Size()
	pos := size
	var lines int64
	buf := make([]byte, 8192)
	for pos > 0 {
		step := int64(len(buf))
		if pos < step {
			step = pos
		}
		pos -= step
		if _, err := f.ReadAt(buf[:step], pos); err != nil {
			return 0
		}
		for i := step - 1; i >= 0; i-- {
			// The newline ending the last line does not start a line.
			if buf[i] == '\n' && pos+i != size-1 {
				lines++
				if lines == n {
					return pos + i + 1
				}
			}
		}
	}
	return 0
}

// ---------------------------------------------------------------------------
// streaming.Runtime: "containers" are local processes

type runtime struct{ k *kubelet }

var _ streaming.Runtime = (*runtime)(nil)

// Exec runs cmd in the container's directory with the given streams. A TTY
// is not emulated: with tty, stderr goes to stdout. Stdin EOF closes the
// process' stdin; a client that goes away (its output cannot be written)
// kills the process group. A non-zero exit becomes utilexec.ExitError, which
// the streaming server turns into the NonZeroExitCode status kubectl reports.
func (rt *runtime) Exec(ctx context.Context, id string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, _ <-chan remotecommand.TerminalSize) error {
	if len(cmd) == 0 {
		return errors.New("no command")
	}
	return rt.run(ctx, id, cmd, in, out, errw, tty)
}

// Attach starts a process per attach that echoes its stdin (cat), or, with
// no stdin, follows the container's log: what a container's main process
// would give an attached client.
func (rt *runtime) Attach(ctx context.Context, id string, in io.Reader, out, errw io.WriteCloser, tty bool, _ <-chan remotecommand.TerminalSize) error {
	cmd := []string{"cat"}
	if in == nil {
		cmd = []string{"tail", "-n", "0", "-f", rt.k.logPath(id)}
	}
	return rt.run(ctx, id, cmd, in, out, errw, tty)
}

func (rt *runtime) run(ctx context.Context, id string, argv []string, in io.Reader, out, errw io.WriteCloser, tty bool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c := exec.CommandContext(ctx, argv[0], argv[1:]...)
	c.Dir = rt.k.containerDir(id)
	c.Env = append(os.Environ(), "HOSTNAME="+nodeName)
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.Cancel = func() error { return syscall.Kill(-c.Process.Pid, syscall.SIGKILL) }
	c.WaitDelay = execWaitDelay
	if out != nil {
		c.Stdout = cancelOnError{out, cancel}
	}
	if tty {
		errw = out
	}
	if errw != nil {
		c.Stderr = cancelOnError{errw, cancel}
	}
	var stdin io.WriteCloser
	if in != nil {
		var err error
		if stdin, err = c.StdinPipe(); err != nil {
			return err
		}
	}
	if err := c.Start(); err != nil {
		return err
	}
	if stdin != nil {
		go func() {
			_, err := io.Copy(stdin, in)
			stdin.Close() // EOF (half-close) reaches the process
			if err != nil && !errors.Is(err, os.ErrClosed) && !errors.Is(err, syscall.EPIPE) {
				cancel() // the stream broke
			}
		}()
	}
	err := c.Wait()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		code := exitErr.ExitCode()
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
		if code != 0 {
			return utilexec.CodeExitError{Err: err, Code: code}
		}
		return nil
	}
	if errors.Is(err, exec.ErrWaitDelay) {
		return nil
	}
	return err
}

// cancelOnError kills the process once its output cannot be delivered.
type cancelOnError struct {
	w      io.Writer
	cancel context.CancelFunc
}

func (c cancelOnError) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	if err != nil {
		c.cancel()
	}
	return n, err
}

// PortForward connects the stream to 127.0.0.1:port. The target's EOF ends
// the stream; the stream's EOF half-closes the connection.
func (rt *runtime) PortForward(ctx context.Context, _ string, port int32, stream io.ReadWriteCloser) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("dialing 127.0.0.1:%d: %w", port, err)
	}
	defer conn.Close()
	go func() {
		_, _ = io.Copy(conn, stream)
		if tcp, ok := conn.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
	}()
	_, err = io.Copy(stream, conn)
	return err
}
