//! Operations: what every other part uses to be run and watched. Nothing here
//! knows about agents, clusters or members.
//!
//! - [`metrics`]: the `/metrics` families, a handle passed to whoever counts;
//! - [`in_flight`]: the requests and streams in progress, which a draining
//!   replica waits for;
//! - [`accept`]: the one accept loop every listening port runs;
//! - [`audit`]: the audit log, one line per request or stream;
//! - [`pending`]: the caps on handshakes not finished yet (hostile peers);
//! - [`warnings`]: which refused connections get a warn line;
//! - [`rate`]: how fast one source may start handshakes;
//! - [`uploads`]: how fast one client's request bodies go to the members;
//! - [`handshakes`]: the clients' TLS handshakes, on threads of their own
//!   below the forwarding ones;
//! - [`signals`]: SIGTERM / SIGINT;
//! - [`trim`]: freed heap given back to the system.

pub mod accept;
pub mod audit;
pub mod handshakes;
pub mod in_flight;
pub mod metrics;
pub mod pending;
pub mod rate;
pub mod signals;
pub mod trim;
pub mod uploads;
pub mod warnings;

/// A loopback source address for tests of the per-source caps.
#[cfg(test)]
pub(crate) fn test_ip(last: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, last])
}
