//! HTTP(S)_PROXY and NO_PROXY: reaching the Tower proxy through a corporate
//! HTTP proxy.
//!
//! Member clusters often sit behind an egress proxy, and Go Tower's agent honours
//! the usual variables, so ours does too. The choice is made once, at start, from
//! the Tower proxy's URL:
//!
//! - `wss://` uses `HTTPS_PROXY` (or `https_proxy`), `ws://` uses `HTTP_PROXY`
//!   (or `http_proxy`); the upper-case name wins when both are set.
//! - `NO_PROXY` (or `no_proxy`) is a comma list of exceptions, matched as Go's
//!   `x/net/http/httpproxy` does: `*` matches everything; `example.com` matches
//!   that host and its subdomains; `.example.com` (or `*.example.com`) only the
//!   subdomains; IP addresses match exactly and CIDR blocks (`10.0.0.0/8`) by
//!   prefix; an entry with `:PORT` matches only that port. Unlike Go, loopback
//!   addresses are not exempt unless listed: a test or a sidecar may well want the
//!   proxy for 127.0.0.1.
//!
//! The egress proxy must be a plain `http://` proxy (the common case); the agent
//! asks it for a tunnel with `CONNECT host:port` and, when the proxy URL carries
//! `user:password@`, authenticates with Basic credentials.

use std::net::IpAddr;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use tunnel::addr::{join_host_port, split_host_port};

use crate::endpoint::Endpoint;

/// An egress HTTP proxy to tunnel through with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// `host:port` to dial (IPv6 in brackets).
    pub address: String,
    /// `Proxy-Authorization` header value, if the URL had credentials.
    pub authorization: Option<String>,
    /// Which variable it came from, for logs and errors.
    pub variable: &'static str,
}

/// Never print the proxy password.
impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProxy")
            .field("address", &self.address)
            .field("authorization", &self.authorization.is_some())
            .field("variable", &self.variable)
            .finish()
    }
}

impl std::fmt::Display for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{} (from {})", self.address, self.variable)
    }
}

impl HttpProxy {
    /// The proxy to use for `endpoint`, if any, from the environment.
    pub fn from_env(
        endpoint: &Endpoint,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let names: [&'static str; 2] = if endpoint.secure() {
            ["HTTPS_PROXY", "https_proxy"]
        } else {
            ["HTTP_PROXY", "http_proxy"]
        };
        let Some((variable, value)) = names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
        else {
            return Ok(None);
        };
        let no_proxy = env("NO_PROXY")
            .filter(|v| !v.trim().is_empty())
            .or_else(|| env("no_proxy"))
            .unwrap_or_default();
        if NoProxy::parse(&no_proxy).matches(endpoint.host(), endpoint.port()) {
            return Ok(None);
        }
        Self::parse(&value, variable).map(Some)
    }

    /// Parse `[http://][user:password@]host[:port]` (port 80 by default).
    pub fn parse(value: &str, variable: &'static str) -> anyhow::Result<Self> {
        let value = value.trim();
        let rest = match value.split_once("://") {
            None => value,
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => bail!(
                "{variable}: {scheme}:// proxies are not supported; use an http:// proxy \
                 (the tunnel to the Tower proxy is still end-to-end TLS for https:// proxy servers)"
            ),
        };
        // Drop any path ("http://proxy:3128/").
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)
            .with_context(|| format!("{variable}: {hostport:?} is not HOST[:PORT]"))?;
        let port = port.unwrap_or(80);
        let authorization = userinfo.map(|u| {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let plain = format!("{}:{}", percent_decode(user), percent_decode(pass));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(plain)
            )
        });
        Ok(Self {
            address: join_host_port(&host, port),
            authorization,
            variable,
        })
    }
}

/// A parsed NO_PROXY list.
#[derive(Debug, Default)]
pub struct NoProxy {
    all: bool,
    rules: Vec<Rule>,
}

#[derive(Debug)]
enum Rule {
    /// `example.com` (host and subdomains) or `.example.com` (subdomains only).
    Domain {
        suffix: String,
        exact_too: bool,
        port: Option<u16>,
    },
    Ip {
        ip: IpAddr,
        port: Option<u16>,
    },
    Cidr {
        net: IpAddr,
        bits: u8,
    },
}

impl NoProxy {
    pub fn parse(list: &str) -> Self {
        let mut parsed = Self::default();
        for entry in list.split(',').map(|e| e.trim().to_ascii_lowercase()) {
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                parsed.all = true;
                continue;
            }
            if let Some((net, bits)) = entry.split_once('/') {
                if let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u8>()) {
                    let max = if net.is_ipv4() { 32 } else { 128 };
                    if bits <= max {
                        parsed.rules.push(Rule::Cidr { net, bits });
                    }
                }
                continue;
            }
            if let Ok(ip) = entry.parse::<IpAddr>() {
                parsed.rules.push(Rule::Ip { ip, port: None });
                continue;
            }
            let Some((host, port)) = split_host_port(&entry) else {
                continue;
            };
            if let Ok(ip) = host.parse::<IpAddr>() {
                parsed.rules.push(Rule::Ip { ip, port });
                continue;
            }
            let host = host.strip_prefix('*').unwrap_or(&host);
            let (suffix, exact_too) = match host.strip_prefix('.') {
                Some(_) => (host.to_string(), false),
                None => (format!(".{host}"), true),
            };
            parsed.rules.push(Rule::Domain {
                suffix,
                exact_too,
                port,
            });
        }
        parsed
    }

    /// True when `host` (no brackets) on `port` must be reached directly.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.rules.iter().any(|rule| match rule {
            Rule::Ip { ip: want, port: p } => ip == Some(*want) && p.is_none_or(|p| p == port),
            Rule::Cidr { net, bits } => ip.is_some_and(|ip| in_cidr(ip, *net, *bits)),
            Rule::Domain {
                suffix,
                exact_too,
                port: p,
            } => {
                ip.is_none()
                    && p.is_none_or(|p| p == port)
                    && (host.ends_with(suffix.as_str()) || (*exact_too && host == suffix[1..]))
            }
        })
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if bits == 0 {
        return true;
    }
    let shift = width - u32::from(bits);
    (ip >> shift) == (net >> shift)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_proxy(list: &str, host: &str, port: u16) -> bool {
        NoProxy::parse(list).matches(host, port)
    }

    #[test]
    fn no_proxy_matches_like_go() {
        assert!(no_proxy("*", "anything", 80));
        assert!(no_proxy("example.com", "example.com", 80));
        assert!(no_proxy("example.com", "tower.example.com", 80));
        assert!(!no_proxy("example.com", "badexample.com", 80));
        assert!(!no_proxy(".example.com", "example.com", 80));
        assert!(no_proxy(".example.com", "a.b.example.com", 80));
        assert!(no_proxy("*.example.com", "a.example.com", 80));
        assert!(no_proxy("  Example.COM , other", "EXAMPLE.com", 443));
        assert!(no_proxy("example.com:8080", "example.com", 8080));
        assert!(!no_proxy("example.com:8080", "example.com", 80));
        assert!(no_proxy("10.0.0.1", "10.0.0.1", 80));
        assert!(!no_proxy("10.0.0.1", "10.0.0.2", 80));
        assert!(no_proxy("10.0.0.0/8", "10.1.2.3", 80));
        assert!(!no_proxy("10.0.0.0/8", "11.1.2.3", 80));
        assert!(no_proxy("fd00::/8", "fd00::1", 80));
        assert!(no_proxy("::1", "::1", 80));
        assert!(no_proxy("[::1]:8080", "::1", 8080));
        assert!(!no_proxy("[::1]:8080", "::1", 80));
        // An IP rule never matches a name and a name rule never matches an IP.
        assert!(!no_proxy("1.2.3.4", "host", 80));
        assert!(!no_proxy("localhost", "127.0.0.1", 80));
        // Loopback is not special: only what is listed bypasses the proxy.
        assert!(!no_proxy("", "127.0.0.1", 80));
        assert!(!no_proxy("example.com", "localhost", 80));
    }

    #[test]
    fn proxy_urls() {
        let p = HttpProxy::parse("http://proxy.corp:3128", "HTTPS_PROXY").unwrap();
        assert_eq!(p.address, "proxy.corp:3128");
        assert_eq!(p.authorization, None);
        let p = HttpProxy::parse("proxy.corp", "HTTP_PROXY").unwrap();
        assert_eq!(p.address, "proxy.corp:80");
        let p = HttpProxy::parse("http://us%40er:p%3Ass@[::1]:3128/", "HTTP_PROXY").unwrap();
        assert_eq!(p.address, "[::1]:3128");
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(p.authorization, Some(format!("Basic {expected}")));
        assert!(!format!("{p:?} {p}").contains("p%3Ass"));
        let e = HttpProxy::parse("socks5://proxy:1080", "HTTP_PROXY").unwrap_err();
        assert!(
            e.to_string()
                .contains("socks5:// proxies are not supported"),
            "{e}"
        );
        assert!(HttpProxy::parse("http://proxy:notaport", "HTTP_PROXY").is_err());
    }

    #[test]
    fn the_variable_follows_the_scheme() {
        let env = |name: &str| match name {
            "HTTP_PROXY" => Some("http://plain:1".to_string()),
            "https_proxy" => Some("http://secure:2".to_string()),
            "NO_PROXY" => Some("skip.example".to_string()),
            _ => None,
        };
        let ws = Endpoint::parse("http://tower:8080").unwrap();
        let wss = Endpoint::parse("https://tower").unwrap();
        let skipped = Endpoint::parse("https://tower.skip.example").unwrap();
        assert_eq!(
            HttpProxy::from_env(&ws, &env).unwrap().unwrap().address,
            "plain:1"
        );
        let p = HttpProxy::from_env(&wss, &env).unwrap().unwrap();
        assert_eq!(
            (p.address.as_str(), p.variable),
            ("secure:2", "https_proxy")
        );
        assert_eq!(HttpProxy::from_env(&skipped, &env).unwrap(), None);
        assert_eq!(HttpProxy::from_env(&ws, &|_| None).unwrap(), None);
    }
}
