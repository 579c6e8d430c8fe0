package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// The harness' PKI lives in DIR/pki. It is made on the first run and reused on
// later ones; a leaf certificate that is missing, unreadable, not signed by
// the CA or close to expiry is made anew (signed by the same CA), and
// everything is made anew if the CA itself is unusable.
//
//	ca.crt, ca.key                cluster CA (ECDSA P-256)
//	apiserver.crt, apiserver.key  serving cert: 127.0.0.1, ::1, localhost,
//	                              kubernetes{,.default{,.svc{,.cluster.local}}},
//	                              the first service IP
//	admin.crt, admin.key          client cert CN=admin, O=system:masters
//	apiserver-kubelet-client.crt, .key
//	                              the apiserver's client cert towards kubelets:
//	                              CN=kube-apiserver-kubelet-client, O=system:masters
//	kubelet.crt, kubelet.key      serving cert of the kubelet stand-in:
//	                              127.0.0.1, harness-node
//	sa.key, sa.pub                service-account token signing key pair
//	front-proxy-ca.crt, .key      the aggregation layer's CA (ECDSA P-256): it
//	                              vouches for the apiserver towards aggregated
//	                              API servers (requestheader-client-ca-file)
//	front-proxy-client.crt, .key  the apiserver's client cert towards them:
//	                              CN=front-proxy-client
type pki struct {
	dir string

	caCert *x509.Certificate
	caKey  crypto.Signer

	frontProxyCACert *x509.Certificate
	frontProxyCAKey  crypto.Signer
}

// frontProxyClientName is the CN of the apiserver's proxy-client certificate,
// the only name aggregated API servers accept (requestheader-allowed-names).
const frontProxyClientName = "front-proxy-client"

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 2 * 365 * 24 * time.Hour
	// A leaf that expires sooner than this is renewed on start.
	renewBefore = 30 * 24 * time.Hour
)

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

func (p *pki) CACert() string      { return p.path("ca.crt") }
func (p *pki) CAKey() string       { return p.path("ca.key") }
func (p *pki) ServingCert() string { return p.path("apiserver.crt") }
func (p *pki) ServingKey() string  { return p.path("apiserver.key") }
func (p *pki) AdminCert() string   { return p.path("admin.crt") }
func (p *pki) AdminKey() string    { return p.path("admin.key") }
func (p *pki) KubeletClientCert() string {
	return p.path("apiserver-kubelet-client.crt")
}
func (p *pki) KubeletClientKey() string {
	return p.path("apiserver-kubelet-client.key")
}
func (p *pki) KubeletCert() string  { return p.path("kubelet.crt") }
func (p *pki) KubeletKey() string   { return p.path("kubelet.key") }
func (p *pki) SAPublicKey() string  { return p.path("sa.pub") }
func (p *pki) SAPrivateKey() string { return p.path("sa.key") }
func (p *pki) FrontProxyCACert() string {
	return p.path("front-proxy-ca.crt")
}
func (p *pki) FrontProxyCAKey() string { return p.path("front-proxy-ca.key") }
func (p *pki) FrontProxyClientCert() string {
	return p.path("front-proxy-client.crt")
}
func (p *pki) FrontProxyClientKey() string {
	return p.path("front-proxy-client.key")
}

// GeneratedDir is the apiserver's --cert-dir (unused while --tls-cert-file
// is given, but kept out of the working directory).
func (p *pki) GeneratedDir() string { return p.path("generated") }

// ensurePKI loads the PKI under dir or makes whatever is missing.
func ensurePKI(dir string, serviceIP net.IP) (*pki, error) {
	p := &pki{dir: dir}
	if err := os.MkdirAll(p.GeneratedDir(), 0o700); err != nil {
		return nil, err
	}

	caCert, caKey, err := loadPair(p.CACert(), p.CAKey())
	if err != nil || !caCert.IsCA || time.Until(caCert.NotAfter) < renewBefore {
		// No usable CA: start over so that no leaf signed by an older CA stays.
		if caCert, caKey, err = p.makeCA(p.CACert(), p.CAKey(), "kube-harness-ca"); err != nil {
			return nil, fmt.Errorf("making the CA: %w", err)
		}
		for _, name := range []string{"apiserver.crt", "apiserver.key", "admin.crt", "admin.key",
			"apiserver-kubelet-client.crt", "apiserver-kubelet-client.key", "kubelet.crt", "kubelet.key"} {
			_ = os.Remove(p.path(name))
		}
	}
	p.caCert, p.caKey = caCert, caKey

	serving := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{
			"localhost",
			"kubernetes",
			"kubernetes.default",
			"kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.IPv6loopback, serviceIP},
	}
	if err := p.ensureLeaf(p.ServingCert(), p.ServingKey(), serving); err != nil {
		return nil, fmt.Errorf("making the serving certificate: %w", err)
	}

	admin := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if err := p.ensureLeaf(p.AdminCert(), p.AdminKey(), admin); err != nil {
		return nil, fmt.Errorf("making the admin certificate: %w", err)
	}

	kubeletClient := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if err := p.ensureLeaf(p.KubeletClientCert(), p.KubeletClientKey(), kubeletClient); err != nil {
		return nil, fmt.Errorf("making the apiserver's kubelet client certificate: %w", err)
	}
	kubelet := &x509.Certificate{
		Subject:     pkix.Name{CommonName: nodeName},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{nodeName},
		IPAddresses: []net.IP{net.ParseIP(nodeIP)},
	}
	if err := p.ensureLeaf(p.KubeletCert(), p.KubeletKey(), kubelet); err != nil {
		return nil, fmt.Errorf("making the kubelet serving certificate: %w", err)
	}

	if err := p.ensureSAKeys(); err != nil {
		return nil, fmt.Errorf("making the service-account keys: %w", err)
	}
	if err := p.ensureFrontProxy(); err != nil {
		return nil, fmt.Errorf("making the front-proxy CA and client certificate: %w", err)
	}
	return p, nil
}

// ensureFrontProxy keeps or makes the aggregation layer's CA and the
// apiserver's client certificate signed by it (a CA of its own, as kubeadm
// does: a certificate of the cluster CA must not pass for the front proxy).
func (p *pki) ensureFrontProxy() error {
	cert, key, err := loadPair(p.FrontProxyCACert(), p.FrontProxyCAKey())
	if err != nil || !cert.IsCA || time.Until(cert.NotAfter) < renewBefore {
		if cert, key, err = p.makeCA(p.FrontProxyCACert(), p.FrontProxyCAKey(), "kube-harness-front-proxy-ca"); err != nil {
			return err
		}
		_ = os.Remove(p.FrontProxyClientCert())
	}
	p.frontProxyCACert, p.frontProxyCAKey = cert, key
	client := &x509.Certificate{
		Subject:     pkix.Name{CommonName: frontProxyClientName},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return ensureLeafOf(cert, key, p.FrontProxyClientCert(), p.FrontProxyClientKey(), client)
}

func (p *pki) makeCA(certFile, keyFile, name string) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	if err := writePair(certFile, keyFile, der, key); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// ensureLeaf keeps the pair at certFile/keyFile if it is signed by the CA, not
// close to expiry and carries the wanted names; else it signs a new one.
func (p *pki) ensureLeaf(certFile, keyFile string, tmpl *x509.Certificate) error {
	return ensureLeafOf(p.caCert, p.caKey, certFile, keyFile, tmpl)
}

// ensureLeafOf is ensureLeaf with the CA given.
func ensureLeafOf(caCert *x509.Certificate, caKey crypto.Signer, certFile, keyFile string, tmpl *x509.Certificate) error {
	if cert, _, err := loadPair(certFile, keyFile); err == nil &&
		cert.CheckSignatureFrom(caCert) == nil &&
		time.Until(cert.NotAfter) > renewBefore &&
		sameNames(cert, tmpl) {
		return nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl.SerialNumber = serial()
	tmpl.NotBefore = now.Add(-time.Hour)
	tmpl.NotAfter = now.Add(leafValidity)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		return err
	}
	return writePair(certFile, keyFile, der, key)
}

func (p *pki) ensureSAKeys() error {
	if data, err := os.ReadFile(p.SAPrivateKey()); err == nil {
		if key, err := parseKey(data); err == nil {
			if _, err := os.Stat(p.SAPublicKey()); err == nil {
				return nil
			}
			return writePublic(p.SAPublicKey(), key.Public())
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(p.SAPrivateKey(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	return writePublic(p.SAPublicKey(), key.Public())
}

func writePublic(path string, pub crypto.PublicKey) error {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
}

func sameNames(cert, tmpl *x509.Certificate) bool {
	if cert.Subject.CommonName != tmpl.Subject.CommonName ||
		fmt.Sprint(cert.Subject.Organization) != fmt.Sprint(tmpl.Subject.Organization) ||
		fmt.Sprint(cert.DNSNames) != fmt.Sprint(tmpl.DNSNames) ||
		len(cert.IPAddresses) != len(tmpl.IPAddresses) {
		return false
	}
	for i := range cert.IPAddresses {
		if !cert.IPAddresses[i].Equal(tmpl.IPAddresses[i]) {
			return false
		}
	}
	return true
}

func loadPair(certFile, keyFile string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("%s: no certificate", certFile)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, err
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyFile, err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, nil, fmt.Errorf("%s does not match %s", keyFile, certFile)
	}
	return cert, key, nil
}

func parseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	switch block.Type {
	case "EC PRIVATE KEY":
		return x509.ParseECPrivateKey(block.Bytes)
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, err
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, errors.New("not a signing key")
		}
		return s, nil
	default:
		return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
	}
}

func writePair(certFile, keyFile string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return writeFileAtomic(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err)
	}
	return n.Add(n, big.NewInt(1))
}

// writeFileAtomic writes data to a temporary file beside path, syncs it and
// renames it over path, so that a reader sees either the old or the new file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
