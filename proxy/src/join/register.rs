//! The member's manifest for self-registration (`join-command --register`):
//! `config/agent/deployment.yaml` turned into what
//! `config/agent-registration` makes of it, no `--token-file` and its
//! volume, the bootstrap token from the Secret `tower-agent-bootstrap` in
//! `AGENT_BOOTSTRAP_TOKEN`. Pure: text in, text out; a unit test keeps the
//! command equal to the overlay's.

use super::render::RenderError;

/// The Secret the registering agent reads its bootstrap token from.
pub fn bootstrap_secret(token: &str) -> String {
    format!(
        "# A bootstrap token of the host (kube-system/bootstrap-token-<id> there):\n\
         # the agent registers with it until it holds its Cluster's token.\n\
         apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  name: tower-agent-bootstrap\n  namespace: kubesphere-system\n  labels:\n    app: tower-agent\n\
         type: Opaque\n\
         stringData:\n  token: \"{token}\"\n"
    )
}

/// Drop the list item `flag` and its value (and a comment just above it)
/// from `lines`; `Err` when the template has no such flag.
fn drop_flag(lines: &mut Vec<&str>, flag: &'static str) -> Result<(), RenderError> {
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- {flag}"))
        .ok_or(RenderError::NoPlaceholder(flag))?;
    let from = if at > 0 && lines[at - 1].trim_start().starts_with('#') {
        at - 1
    } else {
        at
    };
    lines.drain(from..(at + 2).min(lines.len()));
    Ok(())
}

/// The registering agent's Deployment template; `keep_name`: the person
/// chose the name (`--name` stays, with its placeholder).
pub fn template(deployment: &str, keep_name: bool) -> Result<String, RenderError> {
    let mut lines: Vec<&str> = deployment.lines().collect();
    drop_flag(&mut lines, "--token-file")?;
    if !keep_name {
        drop_flag(&mut lines, "--name")?;
    }
    // The token volume and its mount close the base: the Secret they name
    // exists only once the proxy handed a token, and the agent reads it
    // through the API then (--token-secret).
    let mounts = lines
        .iter()
        .position(|l| l.trim() == "volumeMounts:")
        .ok_or(RenderError::NoPlaceholder("volumeMounts:"))?;
    let tail = lines[mounts..].join("\n");
    if !tail.contains("volumes:") || !tail.contains("secretName: tower-agent-token") {
        return Err(RenderError::NoPlaceholder("volumes: the token Secret"));
    }
    let indent = &lines[mounts][..lines[mounts].len() - lines[mounts].trim_start().len()];
    lines.truncate(mounts);
    let mut out = lines.join("\n");
    out.push('\n');
    for line in [
        "env:",
        "- name: AGENT_BOOTSTRAP_TOKEN",
        "  valueFrom:",
        "    secretKeyRef:",
        "      name: tower-agent-bootstrap",
        "      key: token",
    ] {
        out.push_str(&format!("{indent}{line}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = include_str!("../../../config/agent/deployment.yaml");
    const OVERLAY: &str = include_str!("../../../config/agent-registration/deployment-patch.yaml");

    /// The items of the first `command:` list, comments left out.
    fn command(yaml: &str) -> Vec<&str> {
        yaml.lines()
            .skip_while(|l| l.trim() != "command:")
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .take_while(|l| l.starts_with("- "))
            .collect()
    }

    #[test]
    fn the_command_is_the_registration_overlays() {
        let ours = template(BASE, false).unwrap();
        assert_eq!(command(&ours), command(OVERLAY));
        assert!(!ours.contains("volumes:") && !ours.contains("/etc/tower/token"));
        assert!(ours.ends_with(
            "        env:\n        - name: AGENT_BOOTSTRAP_TOKEN\n          valueFrom:\n            \
             secretKeyRef:\n              name: tower-agent-bootstrap\n              key: token\n"
        ));
        assert!(OVERLAY.contains("name: tower-agent-bootstrap"));
    }

    #[test]
    fn a_chosen_name_stays() {
        let ours = template(BASE, true).unwrap();
        let command = command(&ours);
        assert_eq!(command[1..3], ["- --name", "- CLUSTER_NAME"]);
        assert!(!command.contains(&"- --token-file"));
    }
}
