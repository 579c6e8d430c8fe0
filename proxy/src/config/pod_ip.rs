//! The pod's own IP address when `POD_IP` is not set: Kubernetes writes
//! `<pod IP> <hostname>` into every pod's `/etc/hosts`. KubeSphere's
//! Deployment starts Go Tower with `--leader-elect=true` and no `POD_IP`
//! (Go Tower needs no peer address); with this, our image drops into that
//! Deployment unchanged and other replicas still reach this one.

use std::net::IpAddr;

/// The first non-loopback address `hosts` (the text of `/etc/hosts`) gives
/// `hostname`.
pub fn from_hosts(hosts: &str, hostname: &str) -> Option<IpAddr> {
    let hostname = hostname.trim();
    if hostname.is_empty() {
        return None;
    }
    hosts
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            words.any(|name| name == hostname).then_some(ip)
        })
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /etc/hosts as the kubelet writes it for a pod.
    const POD_HOSTS: &str = "# Kubernetes-managed hosts file.\n\
        127.0.0.1\tlocalhost\n\
        ::1\tlocalhost ip6-localhost ip6-loopback\n\
        fe00::0\tip6-localnet\n\
        10.244.1.7\ttower-5d9c7b8f4-x2x7q\n";

    #[test]
    fn a_pods_hosts_file_names_its_ip() {
        assert_eq!(
            from_hosts(POD_HOSTS, "tower-5d9c7b8f4-x2x7q\n"),
            Some("10.244.1.7".parse().unwrap())
        );
    }

    #[test]
    fn loopback_comments_and_other_names_do_not_count() {
        assert_eq!(from_hosts(POD_HOSTS, "localhost"), None);
        assert_eq!(from_hosts(POD_HOSTS, "tower"), None);
        assert_eq!(from_hosts(POD_HOSTS, ""), None);
        assert_eq!(
            from_hosts("# 10.0.0.1 tower-0\n127.0.1.1 tower-0\n", "tower-0"),
            None
        );
        assert_eq!(
            from_hosts(
                "127.0.1.1 tower-0\nfd00::5 tower-0.tower.ns.svc tower-0 # pod\n",
                "tower-0"
            ),
            Some("fd00::5".parse().unwrap())
        );
    }
}
