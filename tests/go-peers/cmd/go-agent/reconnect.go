package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/kubesphere-rs/tower/tests/go-peers/agent"
)

// Go Tower's agent backs off with jpillora/backoff{Factor: 1.4, Max:
// --max-retry-interval} and the library's default minimum of 100 ms.
const (
	backoffMin    = 100 * time.Millisecond
	backoffFactor = 1.4
)

// connectionLoop connects, serves until the connection ends, and dials
// again, as Go Tower's agent (pkg/agent, connectionLoop) does: a failed
// websocket dial, a rejected `config` and a lost connection are retried
// after a growing pause (reset once connected); a failed SSH handshake ends
// the process, as it ends Go Tower's loop. Each success prints `connected`.
func connectionLoop(opts agent.Options, max time.Duration) error {
	attempt := 0
	for {
		s, err := agent.Connect(opts)
		switch {
		case err == nil:
			attempt = 0
			fmt.Println("connected")
			err = fmt.Errorf("connection lost: %w", s.Wait())
		case errors.Is(err, agent.ErrHandshake):
			return err
		}
		if reason, ok := agent.IsRejected(err); ok {
			err = fmt.Errorf("config rejected: %s", reason)
		}
		wait := time.Duration(float64(backoffMin) * pow(backoffFactor, attempt))
		if wait > max || wait <= 0 {
			wait = max
		}
		attempt++
		fmt.Fprintf(os.Stderr, "go-agent: %v; retrying in %s (attempt %d)\n", err, wait, attempt)
		time.Sleep(wait)
	}
}

func pow(x float64, n int) float64 {
	r := 1.0
	for range n {
		r *= x
		if r > 1e9 {
			break
		}
	}
	return r
}
