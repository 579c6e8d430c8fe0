module github.com/kubesphere-rs/tower/tests/go-peers

go 1.26.0

require (
	github.com/gorilla/websocket v1.4.0
	golang.org/x/crypto v0.0.0-20200220183623-bac4c82f6975
)

require golang.org/x/sys v0.49.0 // indirect
