package wire

// AgentConfig is the body of the `config` global request (agent -> proxy).
// It is sent as raw JSON (no SSH string length prefix). Keys are the Go field
// names; []byte fields are base64 strings in JSON.
type AgentConfig struct {
	Version           string
	Name              string
	Token             string
	KubernetesSvcHost string // host:port
	KubeSphereSvcHost string // host:port
	CertData          []byte `json:",omitempty"`
	KeyData           []byte `json:",omitempty"`
	CAData            []byte `json:",omitempty"`
	BearerToken       []byte `json:",omitempty"`
}

const (
	// ConfigRequest is the type of the first global request (authentication).
	ConfigRequest = "config"
	// PingRequest is the agent's keepalive global request.
	PingRequest = "ping"
	// ChannelType is the type of the channels the proxy opens on the agent.
	ChannelType = "kubesphere"
	// Unauthorized is the failure text for a wrong name or token.
	Unauthorized = "Unauthorized agent"
	// AgentVersion is what the Go agent puts into AgentConfig.Version.
	AgentVersion = "v0.2.1"
)
