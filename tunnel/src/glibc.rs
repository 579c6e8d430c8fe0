//! glibc's `memcpy` on AMD Zen. glibc before 2.39 copies blocks from a few
//! KiB up with `rep movsb` on CPUs that announce fast short `rep movsb`
//! (FSRM). On AMD Zen 3 and Zen 4 that instruction runs up to twenty times
//! slower when the destination lies a few bytes after the source modulo
//! 4 KiB (glibc bug 30994; on this project's AMD EPYC VM 16 KiB copies ran at
//! 2.6 GiB/s with the destination 1-31 bytes ahead, 35-85 GiB/s otherwise).
//! rustls's copy of each decrypted record out of its receive buffer lands
//! there: it was half the proxy's `memcpy` time and 11 % of its samples on an
//! https download (`perf`: `take_received_plaintext`, `rep movsb`).
//!
//! glibc 2.39 stopped using `rep movsb` below the L2 cache's size on those
//! CPUs; older glibc takes the same setting from the `GLIBC_TUNABLES`
//! environment variable, read only when a process starts. So on an AMD CPU
//! with FSRM and glibc 2.33 to 2.38, [`fast_copies`] executes the binary once
//! more with `glibc.cpu.x86_rep_movsb_threshold` added to `GLIBC_TUNABLES`,
//! before anything else runs (and [`STARTED_AGAIN`] set, so only once). A
//! threshold the user set is kept (the way to opt out: set it to glibc's
//! default, `2048`). Child processes (the agent's
//! hooks) inherit both variables; they only change how their glibc copies.

/// `rep movsb` only from this size on: above every buffer the tunnel
/// copies, near where glibc 2.39 puts it (the L2 cache's size).
pub const REP_MOVSB_THRESHOLD: usize = 2 * 1024 * 1024;
const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// Our entry in [`ENV`]: `glibc.cpu.x86_rep_movsb_threshold=2097152`.
fn our_entry() -> String {
    format!("{TUNABLE}={REP_MOVSB_THRESHOLD}")
}

/// The process environment's variable glibc reads its tunables from.
pub const ENV: &str = "GLIBC_TUNABLES";
/// Set for the second start: never a third, whatever glibc made of [`ENV`]
/// (it may rewrite it, and older versions do not know the tunable).
pub const STARTED_AGAIN: &str = "TOWER_GLIBC_TUNED";

/// What [`fast_copies`] found: the process runs as it is.
#[derive(Debug)]
pub enum Copies {
    /// Not an affected CPU and glibc, or the user set the threshold.
    AsTheyAre,
    /// Executed again with the threshold ([`ENV`] says so).
    Set,
    /// Affected, but executing again failed: copies stay slow.
    ExecFailed(std::io::Error),
}

impl Copies {
    /// Said once logging is set up.
    pub fn log(&self) {
        match self {
            Copies::AsTheyAre => {}
            Copies::Set => tracing::info!(
                tunable = %our_entry(),
                "started again with this GLIBC_TUNABLES entry: this CPU's rep movsb is slow for \
                 some alignments and this glibc uses it (glibc bug 30994)"
            ),
            Copies::ExecFailed(e) => tracing::warn!(
                error = %e,
                "could not start again with GLIBC_TUNABLES={TUNABLE}={REP_MOVSB_THRESHOLD}: \
                 large copies stay slow on this CPU; set that variable in the environment"
            ),
        }
    }
}

/// The CPU's traits that matter here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cpu {
    pub amd: bool,
    pub fsrm: bool,
}

/// The [`ENV`] value to execute with, or None to run as is: `current` is the
/// variable now, `glibc` the C library's version (major, minor). A value
/// that is not UTF-8 is left alone: rewriting it could lose the user's.
pub fn tunables_for(
    cpu: Cpu,
    glibc: Option<(u32, u32)>,
    current: Option<&std::ffi::OsStr>,
) -> Option<String> {
    // 2.33 brought the tunable (and FSRM's use); 2.39 the fix.
    let old_glibc = glibc.is_some_and(|v| ((2, 33)..(2, 39)).contains(&v));
    if !(cpu.amd && cpu.fsrm && old_glibc) {
        return None;
    }
    let current = match current {
        None => "",
        Some(value) => value.to_str()?,
    };
    // A tunable names its namespace: `glibc.cpu.x86_rep_movsb_threshold=N`,
    // entries separated by colons.
    if current
        .split(':')
        .any(|entry| entry.split('=').next() == Some(TUNABLE))
    {
        return None;
    }
    let ours = our_entry();
    Some(match current {
        "" => ours,
        other => format!("{other}:{ours}"),
    })
}

/// `major.minor` of a version string such as glibc's `2.36`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split('.');
    let major = parts.next()?.trim().parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// See the module docs. Binaries call this first thing in `main`, before
/// threads or files; it returns only when the process goes on as it is.
pub fn fast_copies() -> Copies {
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(STARTED_AGAIN).is_some() {
            // Ours, unless the marker came from a parent that set it.
            let ours = our_entry();
            let set = std::env::var(ENV).is_ok_and(|c| c.split(':').any(|e| e == ours));
            return if set { Copies::Set } else { Copies::AsTheyAre };
        }
        let current = std::env::var_os(ENV);
        let Some(tunables) = tunables_for(this_cpu(), glibc_version(), current.as_deref()) else {
            return Copies::AsTheyAre;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "tower".into());
        // /proc/self/exe: this very binary, even if its file was replaced.
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(arg0)
            .args(args)
            .env(ENV, tunables)
            .env(STARTED_AGAIN, "1")
            .exec();
        Copies::ExecFailed(err)
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
    Copies::AsTheyAre
}

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
fn this_cpu() -> Cpu {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7's answer is used
    // only where leaf 0 says the CPU has it.
    #[allow(unused_unsafe)]
    let (vendor, leaf7) = unsafe { (__cpuid(0), __cpuid_count(7, 0)) };
    let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
    let fsrm = vendor.eax >= 7 && leaf7.edx & (1 << 4) != 0;
    Cpu { amd, fsrm }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
fn glibc_version() -> Option<(u32, u32)> {
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    parse_version(v.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN: Cpu = Cpu {
        amd: true,
        fsrm: true,
    };

    #[test]
    fn only_amd_with_fsrm_and_glibc_before_2_39_executes_again() {
        let ours = "glibc.cpu.x86_rep_movsb_threshold=2097152";
        assert_eq!(
            tunables_for(ZEN, Some((2, 36)), None).as_deref(),
            Some(ours)
        );
        assert_eq!(
            tunables_for(ZEN, Some((2, 33)), None).as_deref(),
            Some(ours)
        );
        assert_eq!(tunables_for(ZEN, Some((2, 39)), None), None);
        assert_eq!(tunables_for(ZEN, Some((2, 32)), None), None);
        assert_eq!(tunables_for(ZEN, Some((3, 0)), None), None);
        assert_eq!(tunables_for(ZEN, None, None), None);
        let intel = Cpu {
            amd: false,
            fsrm: true,
        };
        assert_eq!(tunables_for(intel, Some((2, 36)), None), None);
        let zen2 = Cpu {
            amd: true,
            fsrm: false,
        };
        assert_eq!(tunables_for(zen2, Some((2, 36)), None), None);
    }

    #[test]
    fn the_users_tunables_are_kept_and_their_threshold_wins() {
        assert_eq!(
            tunables_for(ZEN, Some((2, 36)), Some(os("glibc.malloc.arena_max=2"))).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=2097152")
        );
        assert_eq!(
            tunables_for(
                ZEN,
                Some((2, 36)),
                Some(os(
                    "glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=2048"
                ))
            ),
            None
        );
        // Another tunable whose name merely starts alike is not the threshold.
        assert!(
            tunables_for(
                ZEN,
                Some((2, 36)),
                Some(os("glibc.cpu.x86_rep_movsb_threshold_x=1"))
            )
            .is_some()
        );
    }

    fn os(s: &str) -> &std::ffi::OsStr {
        std::ffi::OsStr::new(s)
    }

    #[cfg(unix)]
    #[test]
    fn a_value_that_is_not_utf8_is_left_alone() {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"glibc.malloc.arena_max=\xff");
        assert_eq!(tunables_for(ZEN, Some((2, 36)), Some(odd)), None);
    }

    #[test]
    fn glibc_versions_parse() {
        assert_eq!(parse_version("2.36"), Some((2, 36)));
        assert_eq!(parse_version("2.39.9000"), Some((2, 39)));
        assert_eq!(parse_version("2.41+git"), Some((2, 41)));
        assert_eq!(parse_version("two"), None);
    }
}
