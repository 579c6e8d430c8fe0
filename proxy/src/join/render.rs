//! The manifest a member applies to join: `config/namespace` and
//! `config/agent`, compiled into the binary so the printed manifest is the
//! same YAML as the kustomize bases, with the cluster's values filled in and
//! the token Secret in front; or, for a member that registers itself, the
//! bootstrap token's Secret and the Deployment of `config/agent-registration`
//! ([`super::register`]). Pure: text in, text out.

use super::register;

/// The bases' files, in the order of `config/agent/kustomization.yaml`
/// (a unit test keeps the list equal to it), after the namespace.
const FILES: [(&str, &str); 6] = [
    (
        "namespace/namespace.yaml",
        include_str!("../../../config/namespace/namespace.yaml"),
    ),
    (
        "agent/serviceaccount.yaml",
        include_str!("../../../config/agent/serviceaccount.yaml"),
    ),
    (
        "agent/rbac.yaml",
        include_str!("../../../config/agent/rbac.yaml"),
    ),
    (
        "agent/token-rbac.yaml",
        include_str!("../../../config/agent/token-rbac.yaml"),
    ),
    (
        "agent/registration-rbac.yaml",
        include_str!("../../../config/agent/registration-rbac.yaml"),
    ),
    (
        "agent/deployment.yaml",
        include_str!("../../../config/agent/deployment.yaml"),
    ),
];

/// Placeholders of `config/agent/deployment.yaml` (the README's sed line).
const NAME_PLACEHOLDER: &str = "CLUSTER_NAME";
const PROXY_PLACEHOLDER: &str = "http://PROXY_ADDRESS:8080";
const IMAGE_PLACEHOLDER: &str = "image: tower-rs:latest";

/// How the member's agent gets in.
pub enum Join<'a> {
    /// As Cluster `cluster`, with its `spec.connection.token`.
    Cluster { cluster: &'a str, token: &'a str },
    /// Registering itself with a bootstrap token (docs/registration.md), as
    /// `name` or, without one, the name derived from its cluster ID.
    Register {
        name: Option<&'a str>,
        bootstrap_token: &'a str,
    },
}

/// What the member's manifest is made of.
pub struct Inputs<'a> {
    pub join: Join<'a>,
    /// What the agent dials (`--proxy-server`).
    pub proxy_url: &'a str,
    /// Host-key fingerprints the agent pins (none: no pinning).
    pub fingerprints: &'a [String],
    pub image: &'a str,
}

/// Why a value cannot go into the manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error(
        "{what} {value:?} cannot be written into the manifest: it holds a quote, a space or a \
         line break"
    )]
    Unsafe { what: &'static str, value: String },
    #[error(
        "config/agent/deployment.yaml has no {0} placeholder: the bases changed, update proxy/src/join/render.rs"
    )]
    NoPlaceholder(&'static str),
}

fn safe(what: &'static str, value: &str) -> Result<(), RenderError> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | '#'))
    {
        return Err(RenderError::Unsafe {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// The Secret the Deployment reads `--token-file` from.
fn token_secret(token: &str) -> String {
    format!(
        "# The Cluster's agent token (spec.connection.token on the host).\n\
         apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  name: tower-agent-token\n  namespace: kubesphere-system\n  labels:\n    app: tower-agent\n\
         type: Opaque\n\
         stringData:\n  token: \"{token}\"\n"
    )
}

/// `template` with the name (none: the template has no `--name`), the
/// proxy, the pins and the image filled in.
fn deployment(
    template: &str,
    name: Option<&str>,
    inputs: &Inputs<'_>,
) -> Result<String, RenderError> {
    let needed = [NAME_PLACEHOLDER, PROXY_PLACEHOLDER, IMAGE_PLACEHOLDER];
    for placeholder in &needed[usize::from(name.is_none())..] {
        if !template.contains(placeholder) {
            return Err(RenderError::NoPlaceholder(placeholder));
        }
    }
    let mut out = String::new();
    for line in template.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let filled = line
            .replace(NAME_PLACEHOLDER, name.unwrap_or(NAME_PLACEHOLDER))
            .replace(PROXY_PLACEHOLDER, inputs.proxy_url)
            .replace(IMAGE_PLACEHOLDER, &format!("image: {}", inputs.image));
        out.push_str(&filled);
        out.push('\n');
        if line.contains(PROXY_PLACEHOLDER) {
            for fingerprint in inputs.fingerprints {
                out.push_str(&format!(
                    "{indent}- --proxy-host-key-fingerprint\n{indent}- {fingerprint}\n"
                ));
            }
        }
    }
    Ok(out)
}

/// The whole manifest, YAML documents separated by `---`.
pub fn render(inputs: &Inputs<'_>) -> Result<String, RenderError> {
    match inputs.join {
        Join::Cluster { cluster, token } => {
            safe("the cluster name", cluster)?;
            safe("the token", token)?;
        }
        Join::Register {
            name,
            bootstrap_token,
        } => {
            if let Some(name) = name {
                safe("the cluster name", name)?;
            }
            safe("the bootstrap token", bootstrap_token)?;
        }
    }
    safe("the proxy address", inputs.proxy_url)?;
    safe("the image", inputs.image)?;
    for fingerprint in inputs.fingerprints {
        safe("the host-key fingerprint", fingerprint)?;
    }
    let mut docs = Vec::new();
    for (name, text) in FILES {
        if name == "agent/deployment.yaml" {
            match inputs.join {
                Join::Cluster { cluster, token } => {
                    docs.push(token_secret(token));
                    docs.push(deployment(text, Some(cluster), inputs)?);
                }
                Join::Register {
                    name,
                    bootstrap_token,
                } => {
                    docs.push(register::bootstrap_secret(bootstrap_token));
                    let template = register::template(text, name.is_some())?;
                    docs.push(deployment(&template, name, inputs)?);
                }
            }
        } else {
            docs.push(text.to_string());
        }
    }
    Ok(docs
        .iter()
        .map(|d| d.trim_end().to_string() + "\n")
        .collect::<Vec<_>>()
        .join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(fingerprints: &'a [String]) -> Inputs<'a> {
        Inputs {
            join: Join::Cluster {
                cluster: "alpha",
                token: "0123abcd",
            },
            proxy_url: "https://tower.example.com:443",
            fingerprints,
            image: "registry.example.com/tower-rs:v1",
        }
    }

    #[test]
    fn the_bases_listed_are_the_kustomization_resources() {
        let kustomization = include_str!("../../../config/agent/kustomization.yaml");
        let listed: Vec<&str> = kustomization
            .lines()
            .filter_map(|l| l.strip_prefix("- "))
            .map(str::trim)
            .collect();
        let ours: Vec<&str> = FILES
            .iter()
            .filter_map(|(name, _)| name.strip_prefix("agent/"))
            .collect();
        assert_eq!(
            ours, listed,
            "keep FILES in render.rs equal to config/agent's resources"
        );
    }

    #[test]
    fn fills_every_placeholder_and_pins_the_keys() {
        let keys = ["SHA256:old".to_string(), "SHA256:new".to_string()];
        let text = render(&inputs(&keys)).unwrap();
        for placeholder in ["CLUSTER_NAME", "PROXY_ADDRESS", "tower-rs:latest"] {
            assert!(
                !text.contains(placeholder),
                "{placeholder} left in:\n{text}"
            );
        }
        assert!(
            text.contains("        - --name\n        - alpha\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "        - https://tower.example.com:443\n        - --proxy-host-key-fingerprint\n        - SHA256:old\n        - --proxy-host-key-fingerprint\n        - SHA256:new\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("image: registry.example.com/tower-rs:v1"),
            "{text}"
        );
        assert!(
            text.contains("stringData:\n  token: \"0123abcd\"\n"),
            "{text}"
        );
        // One separator before each file (the Secret comes first), plus those
        // inside files of several documents.
        let inside: usize = FILES
            .iter()
            .map(|(_, t)| t.matches("\n---\n").count())
            .sum();
        assert_eq!(
            text.matches("\n---\n").count(),
            FILES.len() + inside,
            "{text}"
        );
        // The Secret comes before the Deployment that mounts it.
        assert!(text.find("kind: Secret") < text.find("kind: Deployment"));
    }

    #[test]
    fn refuses_values_that_would_break_the_yaml() {
        let mut bad = inputs(&[]);
        bad.join = Join::Cluster {
            cluster: "alpha",
            token: "a\"b",
        };
        assert!(matches!(
            render(&bad),
            Err(RenderError::Unsafe {
                what: "the token",
                ..
            })
        ));
        let mut bad = inputs(&[]);
        bad.proxy_url = "http://x\n- --evil";
        assert!(render(&bad).is_err());
    }
}
