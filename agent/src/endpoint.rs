//! Where the Tower proxy is: `--proxy-server` parsed once into a websocket URL.
//!
//! ```text
//! --proxy-server http://tower:8080/x  ->  ws://tower:8080/x
//! --proxy-server https://tower        ->  wss://tower:443/
//! --proxy-server http://[fd00::1]     ->  ws://[fd00::1]:80/
//! ```
//!
//! Its own module because two others read it and neither should own it:
//! [`proxy_env`](crate::proxy_env) decides from its scheme and host whether an
//! egress proxy is used, and [`dial`](crate::dial) connects to it.

use tunnel::addr::{join_host_port, split_host_port};

/// Where the Tower proxy is: `--proxy-server` mapped to a websocket URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    secure: bool,
    /// Without brackets.
    host: String,
    port: u16,
    /// Path and query, at least `/`.
    path: String,
}

impl Endpoint {
    /// Map `http://` to `ws://` and `https://` to `wss://` (`ws://` and `wss://`
    /// are taken as they are), adding port 80 or 443 when none is given.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expected = "expected http://HOST[:PORT][/PATH] or https://HOST[:PORT][/PATH]";
        let uri: hyper::Uri = text
            .trim()
            .parse()
            .map_err(|e| format!("{e}; {expected}"))?;
        let secure = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http" | "ws") => false,
            Some("https" | "wss") => true,
            Some(other) => return Err(format!("unsupported scheme {other:?}; {expected}")),
            None => return Err(format!("no scheme; {expected}")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("no host; {expected}"))?;
        if authority.as_str().contains('@') {
            return Err(
                "credentials in the URL are not supported; the agent authenticates with its token"
                    .into(),
            );
        }
        let (host, _) = split_host_port(authority.as_str())
            .ok_or_else(|| format!("{:?} is not HOST[:PORT]; {expected}", authority.as_str()))?;
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") => "/".to_string(),
            Some(p) if p.starts_with('/') => p.to_string(),
            Some(p) => format!("/{p}"),
        };
        Ok(Self {
            secure,
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    /// True for `wss://`.
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Host name or address, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` to dial (brackets around IPv6).
    pub fn authority(&self) -> String {
        join_host_port(&self.host, self.port)
    }

    /// Path and query, at least `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The full websocket URL, port always shown.
    pub fn url(&self) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }

    /// `Host` header: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.secure { 443 } else { 80 };
        if self.port == default {
            join_host_port(&self.host, self.port)
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default()
        } else {
            self.authority()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_server_urls_map_to_websocket_urls() {
        let url = |s: &str| Endpoint::parse(s).map(|e| e.url());
        assert_eq!(
            url("http://127.0.0.1:8080"),
            Ok("ws://127.0.0.1:8080/".into())
        );
        assert_eq!(url("http://tower"), Ok("ws://tower:80/".into()));
        assert_eq!(url("https://tower"), Ok("wss://tower:443/".into()));
        assert_eq!(
            url("https://Tower.example:8443/a/b?c=d"),
            Ok("wss://tower.example:8443/a/b?c=d".into())
        );
        assert_eq!(url("http://[::1]:8080"), Ok("ws://[::1]:8080/".into()));
        assert_eq!(url("https://[fd00::1]"), Ok("wss://[fd00::1]:443/".into()));
        assert_eq!(url("ws://tower:1"), Ok("ws://tower:1/".into()));
        assert!(
            url("ftp://tower")
                .unwrap_err()
                .contains("unsupported scheme")
        );
        assert!(url("tower:8080").is_err());
        assert!(
            url("http://user:pw@tower")
                .unwrap_err()
                .contains("credentials")
        );
        let e = Endpoint::parse("https://[::1]").unwrap();
        assert_eq!((e.host(), e.port(), e.secure()), ("::1", 443, true));
        assert_eq!(e.host_header(), "[::1]");
        assert_eq!(
            Endpoint::parse("http://h:81").unwrap().host_header(),
            "h:81"
        );
        assert_eq!(Endpoint::parse("http://h:80").unwrap().host_header(), "h");
    }
}
