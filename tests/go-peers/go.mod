module github.com/kubesphere-rs/tower/tests/go-peers

go 1.26.0

require (
	github.com/gorilla/websocket v1.5.3
	golang.org/x/crypto v0.58.0
)

require golang.org/x/sys v0.49.0 // indirect
