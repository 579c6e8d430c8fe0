//! What an agent may dial when the proxy asks: the two API servers it
//! advertises, always, and whatever its `--allow-dial` rules allow. The agent
//! checks every channel's target against this list itself; the proxy never
//! decides for it.
//!
//! A rule is `HOST-PART:PORTS`, PORTS one port or `LOW-HIGH`:
//!
//! | rule                        | allows                                          |
//! |-----------------------------|-------------------------------------------------|
//! | `10.0.0.0/8:1-65535`        | any port of an IP address in 10.0.0.0/8         |
//! | `192.168.1.7:8000`          | that address (a /32), port 8000                 |
//! | `[fd00::/8]:443`            | IPv6 addresses in fd00::/8, port 443            |
//! | `registry.example.com:5000` | that host name, as the proxy asked for it       |
//! | `*.svc.cluster.local:443`   | names ending in `.svc.cluster.local`, port 443  |
//!
//! Address rules match targets given as IP addresses; name rules match
//! targets given as names (compared without case). A name is not resolved to
//! check an address rule: a rule says what the proxy may ask for.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::addr::split_host_port;

/// One `--allow-dial` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    ports: RangeInclusive<u16>,
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    /// An address and the length of its prefix.
    Net(IpAddr, u8),
    /// One name, lower case.
    Name(String),
    /// `*.suffix`: the suffix with its leading dot, lower case.
    Suffix(String),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Rule {
    /// Parse a rule; the error says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "{text:?} is not a dial rule ({why}); expected CIDR:PORT, CIDR:LOW-HIGH, HOST:PORT \
                 or *.DNS-SUFFIX:PORT, e.g. 10.0.0.0/8:1-65535 or *.svc.cluster.local:443"
            )
        };
        let (host, ports) = match text.strip_prefix('[') {
            Some(rest) => {
                let (host, ports) = rest.split_once("]:").ok_or_else(|| bad("no port"))?;
                (host, ports)
            }
            None => text.rsplit_once(':').ok_or_else(|| bad("no port"))?,
        };
        let ports =
            parse_ports(ports).ok_or_else(|| bad("ports must be N or LOW-HIGH in 1-65535"))?;
        let host = if let Some(suffix) = host.strip_prefix("*.") {
            if !is_name(suffix) {
                return Err(bad("not a DNS suffix after *."));
            }
            HostPattern::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
        } else if let Some((addr, prefix)) = host.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| bad("not an IP address before /"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("prefix length out of range"))?;
            HostPattern::Net(addr, prefix)
        } else if let Ok(addr) = host.parse::<IpAddr>() {
            HostPattern::Net(addr, if addr.is_ipv4() { 32 } else { 128 })
        } else if is_name(host) {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad("not an address, a network or a host name"));
        };
        Ok(Self {
            host,
            ports,
            text: text.to_string(),
        })
    }

    /// True when this rule allows `host` (an address or a name) on `port`.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        if !self.ports.contains(&port) {
            return false;
        }
        match (&self.host, host.parse::<IpAddr>()) {
            (HostPattern::Net(net, prefix), Ok(ip)) => in_network(ip, *net, *prefix),
            (HostPattern::Name(name), Err(_)) => host.eq_ignore_ascii_case(name),
            (HostPattern::Suffix(suffix), Err(_)) => {
                let host = host.to_ascii_lowercase();
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
            _ => false,
        }
    }
}

fn parse_ports(text: &str) -> Option<RangeInclusive<u16>> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let (low, high): (u16, u16) = (low.parse().ok()?, high.parse().ok()?);
    (low >= 1 && low <= high).then_some(low..=high)
}

/// A DNS name: labels of letters, digits and `-`, separated by dots.
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Every target an agent serves: the addresses it advertised, exactly, and
/// its rules.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    advertised: Vec<String>,
    rules: Vec<Rule>,
}

impl AllowList {
    pub fn new(advertised: Vec<String>, rules: Vec<Rule>) -> Self {
        Self { advertised, rules }
    }

    /// Whether the proxy may open a channel to `target` (`host:port`), or
    /// why not, in words the proxy can pass on to its client.
    pub fn check(&self, target: &str) -> Result<(), String> {
        if self.advertised.iter().any(|a| a == target) {
            return Ok(());
        }
        let Some((host, Some(port))) = split_host_port(target) else {
            return Err(format!("{target:?} is not HOST:PORT"));
        };
        if self.rules.iter().any(|r| r.allows(&host, port)) {
            return Ok(());
        }
        Err(if self.rules.is_empty() {
            format!(
                "the agent dials only the API servers it advertises; allow {target} with \
                 the agent's --allow-dial"
            )
        } else {
            format!("{target} matches none of the agent's --allow-dial rules")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        Rule::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn networks() {
        let r = rule("10.0.0.0/8:1-65535");
        assert!(r.allows("10.1.2.3", 443));
        assert!(r.allows("10.255.255.255", 1));
        assert!(!r.allows("11.0.0.1", 443));
        assert!(
            !r.allows("ten.example", 443),
            "names never match address rules"
        );
        let one = rule("192.168.1.7:8000");
        assert!(one.allows("192.168.1.7", 8000));
        assert!(!one.allows("192.168.1.7", 8001));
        assert!(!one.allows("192.168.1.8", 8000));
        let v6 = rule("[fd00::/8]:443");
        assert!(v6.allows("fd12::1", 443));
        assert!(!v6.allows("fe80::1", 443));
        assert!(!v6.allows("10.0.0.1", 443));
        assert!(rule("0.0.0.0/0:22").allows("203.0.113.9", 22));
    }

    #[test]
    fn names_and_suffixes() {
        let name = rule("Registry.Example.com:5000");
        assert!(name.allows("registry.example.COM", 5000));
        assert!(!name.allows("registry.example.com.evil", 5000));
        let suffix = rule("*.svc.cluster.local:443");
        assert!(suffix.allows("api.default.svc.cluster.local", 443));
        assert!(
            !suffix.allows("svc.cluster.local", 443),
            "the suffix alone is not under it"
        );
        assert!(!suffix.allows("evilsvc.cluster.local", 443));
        assert!(!suffix.allows("10.0.0.1", 443));
    }

    #[test]
    fn bad_rules_are_explained() {
        for bad in [
            "10.0.0.0/8",
            "10.0.0.0/33:80",
            "10.0.0.0/8:0",
            "10.0.0.0/8:90-80",
            "*.:443",
            "*.bad_name:443",
            "[fd00::/8:443",
            "host name:80",
            ":80",
        ] {
            let e = Rule::parse(bad).unwrap_err();
            assert!(
                e.contains("--allow-dial") || e.contains("dial rule"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_advertised_targets_are_always_allowed_and_nothing_else_by_default() {
        let list = AllowList::new(vec!["kubernetes.default.svc:443".into()], vec![]);
        assert!(list.check("kubernetes.default.svc:443").is_ok());
        let e = list.check("10.0.0.5:8000").unwrap_err();
        assert!(e.contains("--allow-dial"), "{e}");
        let ruled = AllowList::new(vec![], vec![rule("127.0.0.1:8000")]);
        assert!(ruled.check("127.0.0.1:8000").is_ok());
        assert!(
            ruled
                .check("127.0.0.1:8001")
                .unwrap_err()
                .contains("none of")
        );
        assert!(ruled.check("no-port").unwrap_err().contains("HOST:PORT"));
    }
}
