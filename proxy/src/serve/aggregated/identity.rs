//! Who is calling, as the front proxy vouches: the caller's name, groups,
//! uid and extra fields from the request headers the host's ConfigMap names
//! ([`super::trust::Trust`]), believed only after the TLS handshake proved
//! the front-proxy certificate and its common name is an allowed one.
//! This is the kube-apiserver's own request-header authenticator, in small.

use std::net::IpAddr;

use hyper::header::HeaderMap;

use super::trust::Trust;
use crate::ops::audit::Caller;

/// The address the front proxy's own client came from: the last entry of
/// `X-Forwarded-For`, which the kube-apiserver appends when it proxies to an
/// aggregated API (earlier entries are what its client claimed, so they are
/// not believed). Read only once the front proxy is authenticated.
pub fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
    entry.trim_matches(|c| c == '[' || c == ']').parse().ok()
}

/// The vouched caller, or why the request is unauthenticated (a 401).
/// `cn` is the client certificate's common name when the handshake verified
/// one against the front-proxy CA, `None` without a certificate.
pub fn caller(trust: &Trust, cn: Option<&str>, headers: &HeaderMap) -> Result<Vouched, String> {
    let Some(cn) = cn else {
        return Err(
            "no front-proxy client certificate: reach this API through the host \
                    kube-apiserver (/apis/tower.kubesphere.io/...)"
                .into(),
        );
    };
    if !trust.allowed_names.is_empty() && !trust.allowed_names.iter().any(|n| n == cn) {
        return Err(format!(
            "the client certificate {cn:?} is not among the front proxy's allowed names"
        ));
    }
    let user = trust
        .user_headers
        .iter()
        .find_map(|h| first(headers, h))
        .ok_or("the front proxy named no user")?;
    let groups = trust
        .group_headers
        .iter()
        .flat_map(|h| all(headers, h))
        .collect();
    let uid = trust.uid_headers.iter().find_map(|h| first(headers, h));
    let mut extra: Vec<(String, Vec<String>)> = Vec::new();
    for (name, value) in headers {
        let Some(key) = trust.extra_prefixes.iter().find_map(|p| {
            let p = p.to_ascii_lowercase();
            name.as_str().strip_prefix(p.as_str())
        }) else {
            continue;
        };
        let (Ok(value), key) = (value.to_str(), unescape(key).to_lowercase()) else {
            continue;
        };
        match extra.iter_mut().find(|(k, _)| *k == key) {
            Some((_, values)) => values.push(value.to_string()),
            None => extra.push((key, vec![value.to_string()])),
        }
    }
    Ok(Vouched {
        caller: Caller {
            groups,
            extra,
            ..Caller::named(user)
        },
        uid,
    })
}

/// The caller and, when the front proxy sent one, its uid (for the
/// SubjectAccessReview only).
#[derive(Debug)]
pub struct Vouched {
    pub caller: Caller,
    pub uid: Option<String>,
}

fn all<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = String> + 'a {
    headers
        .get_all(name.to_ascii_lowercase().as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into_iter()
}

fn first(headers: &HeaderMap, name: &str) -> Option<String> {
    all(headers, name).next()
}

/// Extra keys arrive percent-encoded in header names.
fn unescape(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn trust(allowed: &[&str]) -> Trust {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Trust {
            roots: Vec::new(),
            allowed_names: s(allowed),
            user_headers: s(&["X-Remote-User"]),
            group_headers: s(&["X-Remote-Group"]),
            extra_prefixes: s(&["X-Remote-Extra-"]),
            uid_headers: s(&["X-Remote-Uid"]),
        }
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", HeaderValue::from_static("jane"));
        h.append("x-remote-group", HeaderValue::from_static("dev"));
        h.append(
            "x-remote-group",
            HeaderValue::from_static("system:authenticated"),
        );
        h.insert("x-remote-uid", HeaderValue::from_static("42"));
        h.append(
            "x-remote-extra-example.com%2fscopes",
            HeaderValue::from_static("read"),
        );
        h
    }

    #[test]
    fn the_client_address_is_the_last_forwarded_entry() {
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h), None);
        // What the client claimed first, what the kube-apiserver saw last.
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 10.0.0.7"),
        );
        assert_eq!(forwarded_for(&h), Some([10, 0, 0, 7].into()));
        h.append("x-forwarded-for", HeaderValue::from_static("fd00::9"));
        assert_eq!(forwarded_for(&h), "fd00::9".parse().ok());
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("not an address"),
        );
        assert_eq!(forwarded_for(&h), None);
    }

    #[test]
    fn the_vouched_caller_comes_from_the_headers() {
        let v = caller(
            &trust(&["front-proxy-client"]),
            Some("front-proxy-client"),
            &headers(),
        )
        .unwrap();
        assert_eq!(v.caller.user, "jane");
        assert_eq!(v.caller.groups, ["dev", "system:authenticated"]);
        assert_eq!(v.uid.as_deref(), Some("42"));
        assert_eq!(
            v.caller.extra,
            [("example.com/scopes".to_string(), vec!["read".to_string()])]
        );
    }

    #[test]
    fn only_an_allowed_front_proxy_may_name_the_caller() {
        let t = trust(&["front-proxy-client"]);
        assert!(caller(&t, None, &headers()).is_err());
        let err = caller(&t, Some("admin"), &headers()).unwrap_err();
        assert!(err.contains("allowed names"), "{err}");
        // No list: any certificate of the front-proxy CA.
        assert!(caller(&trust(&[]), Some("admin"), &headers()).is_ok());
        assert!(caller(&t, Some("front-proxy-client"), &HeaderMap::new()).is_err());
    }
}
