//! The open-files limit. A proxy holds a socket per agent and per stream,
//! an agent one per stream, and the usual default soft limit (1024) is far
//! below the hard limit. Go programs (Go Tower included) raise the soft
//! limit to the hard one at start since Go 1.19; ours do the same, so a
//! thousand concurrent streams do not end in "too many open files".

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// What [`raise_open_files`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// The soft limit was already the hard one.
    Already(u64),
    /// Raised from, to.
    From(u64, u64),
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_open_files() -> Result<Raised, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(Raised::Already(soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(Raised::From(soft, hard))
}

/// [`raise_open_files`], logged: binaries call this once at start.
pub fn raise_open_files_logged() {
    match raise_open_files() {
        Ok(Raised::From(soft, hard)) => {
            tracing::debug!(from = soft, to = hard, "raised the open-files soft limit")
        }
        Ok(Raised::Already(_)) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files soft limit; many concurrent streams may fail with \"too many open files\" (raise it with ulimit -n)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        raise_open_files().expect("raise");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(soft, hard);
        assert!(matches!(raise_open_files(), Ok(Raised::Already(n)) if n == hard));
    }
}
