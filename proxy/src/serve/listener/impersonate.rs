//! Impersonation on the member: for a caller the proxy knows by name (a
//! host user through the aggregated API, a personal certificate), the
//! request reaches the member with `Impersonate-User`, `-Group` and
//! `-Extra-*` of that caller on top of the agent's credentials, so the
//! member's RBAC judges the person and the agent's ServiceAccount needs only
//! the `impersonate` verb (`config/agent/impersonate-rbac.yaml`).
//!
//! Whatever `Impersonate-*` the client sent is removed first: a caller
//! impersonated by the proxy must not pick another identity.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::ops::audit::Caller;

const USER: &str = "impersonate-user";
const GROUP: &str = "impersonate-group";
const UID: &str = "impersonate-uid";
const EXTRA_PREFIX: &str = "impersonate-extra-";

/// Replace the client's `Impersonate-*` headers by `caller`'s identity.
/// Fails (naming the field) when a name cannot be sent as a header value.
pub fn apply(headers: &mut HeaderMap, caller: &Caller) -> Result<(), String> {
    strip(headers);
    headers.insert(USER, value("user name", &caller.user)?);
    for group in &caller.groups {
        headers.append(GROUP, value("group", group)?);
    }
    for (key, values) in &caller.extra {
        let name = HeaderName::from_bytes(format!("{EXTRA_PREFIX}{}", escape(key)).as_bytes())
            .map_err(|_| format!("extra field {key:?} cannot be impersonated"))?;
        for v in values {
            headers.append(name.clone(), value("extra value", v)?);
        }
    }
    Ok(())
}

/// Remove every `Impersonate-*` header.
pub fn strip(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k == USER || k == GROUP || k == UID || k.starts_with(EXTRA_PREFIX)
        })
        .cloned()
        .collect();
    for name in named {
        headers.remove(name);
    }
}

fn value(what: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("the {what} {v:?} cannot be sent as a header"))
}

/// Extra keys are percent-encoded in header names (as client-go does), so
/// `example.com/scopes` survives.
fn escape(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'!'
                    | b'#'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_own_impersonation_is_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert("Impersonate-User", HeaderValue::from_static("system:admin"));
        headers.insert(
            "Impersonate-Group",
            HeaderValue::from_static("system:masters"),
        );
        headers.insert("Impersonate-Uid", HeaderValue::from_static("1"));
        headers.insert("Impersonate-Extra-Scopes", HeaderValue::from_static("all"));
        let caller = Caller {
            groups: vec!["dev".into(), "system:authenticated".into()],
            impersonated: true,
            extra: vec![("example.com/scopes".into(), vec!["read".into()])],
            ..Caller::named("jane")
        };
        apply(&mut headers, &caller).unwrap();
        assert_eq!(headers["impersonate-user"], "jane");
        let groups: Vec<_> = headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["dev", "system:authenticated"]);
        assert!(headers.get("impersonate-uid").is_none());
        assert!(headers.get("impersonate-extra-scopes").is_none());
        assert_eq!(headers["impersonate-extra-example.com%2Fscopes"], "read");
    }

    #[test]
    fn a_name_that_is_no_header_value_is_refused() {
        let caller = Caller::named("jane\nx");
        let err = apply(&mut HeaderMap::new(), &caller).unwrap_err();
        assert!(err.contains("user name"), "{err}");
    }
}
