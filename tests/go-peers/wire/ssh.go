package wire

import "golang.org/x/crypto/ssh"

// SSH identification strings (they enter the key-exchange hash: byte-exact).
const (
	ClientVersion = "SSH-kubesphere-v1-client"
	ServerVersion = "SSH-kubesphere-v1-server"
)

// Algorithms spoken by Go Tower v0.2.1 (its pinned golang.org/x/crypto), in
// its preference order. Current x/crypto still implements all of them: an
// explicitly configured list is only filtered against what is implemented,
// so the legacy ones (diffie-hellman-group14-sha1, ssh-rsa) need no opt-in
// beyond being listed here. String literals rather than x/crypto constants
// so that this also compiles against Tower's 2019 x/crypto (go.tower.mod).
var (
	TowerKeyExchanges = []string{
		"curve25519-sha256@libssh.org",
		"ecdh-sha2-nistp256",
		"ecdh-sha2-nistp384",
		"ecdh-sha2-nistp521",
		"diffie-hellman-group14-sha1",
	}
	TowerCiphers = []string{
		"aes128-gcm@openssh.com",
		"chacha20-poly1305@openssh.com",
		"aes128-ctr",
		"aes192-ctr",
		"aes256-ctr",
	}
	TowerMACs = []string{
		"hmac-sha2-256-etm@openssh.com",
		"hmac-sha2-256",
	}
	TowerHostKeyAlgorithms = []string{
		"ecdsa-sha2-nistp256",
		"ssh-ed25519",
		"ssh-rsa", // SHA-1 signatures
	}
)

// ApplyTowerAlgorithms restricts c to the Go Tower v0.2.1 algorithm set.
// (Host key algorithms are set separately: ClientConfig.HostKeyAlgorithms on
// the agent; on the proxy they follow from its ECDSA P-256 host key.)
func ApplyTowerAlgorithms(c *ssh.Config) {
	c.KeyExchanges = append([]string(nil), TowerKeyExchanges...)
	c.Ciphers = append([]string(nil), TowerCiphers...)
	c.MACs = append([]string(nil), TowerMACs...)
}
