//! The agent's platform as Go names it (`linux/amd64`), for the Cluster's
//! `status.platform`: what Clusternet's agents report, so a user can tell at
//! a glance which build runs in the member.
//!
//! Rust names architectures after the CPU (`x86_64`, `aarch64`); Go after its
//! own port (`amd64`, `arm64`). The agent sends Go's spelling in the `Platform`
//! key of its `config` ([`crate::wire::AgentConfig::platform`]); Go Tower agents
//! send none, and the status then says nothing.

/// `GOOS/GOARCH` of the running binary, e.g. `linux/amd64`.
pub fn current() -> String {
    go_platform(
        std::env::consts::OS,
        std::env::consts::ARCH,
        cfg!(target_endian = "little"),
    )
}

/// `GOOS/GOARCH` for Rust's `os` and `arch` (`std::env::consts`); an
/// architecture Go has no other name for keeps Rust's.
pub fn go_platform(os: &str, arch: &str, little_endian: bool) -> String {
    let arch = match (arch, little_endian) {
        ("x86_64", _) => "amd64",
        ("x86", _) => "386",
        ("aarch64", _) => "arm64",
        ("powerpc64", true) => "ppc64le",
        ("powerpc64", false) => "ppc64",
        ("loongarch64", _) => "loong64",
        ("mips", true) => "mipsle",
        ("mips64", true) => "mips64le",
        // arm, riscv64, s390x, wasm32... are spelt alike.
        (other, _) => other,
    };
    format!("{os}/{arch}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_targets_get_go_names() {
        assert_eq!(go_platform("linux", "x86_64", true), "linux/amd64");
        assert_eq!(go_platform("linux", "aarch64", true), "linux/arm64");
        assert_eq!(go_platform("linux", "powerpc64", true), "linux/ppc64le");
        assert_eq!(go_platform("linux", "s390x", false), "linux/s390x");
        assert_eq!(go_platform("linux", "arm", true), "linux/arm");
        assert_eq!(go_platform("darwin", "aarch64", true), "darwin/arm64");
        assert!(current().starts_with(std::env::consts::OS));
    }
}
