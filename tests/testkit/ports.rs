//! Blocks of cluster ports (`--cluster-ports`) that no two tests share.
//!
//! The proxy gives each Cluster a kube API port from its range and a ks
//! port 10000 above it, records both in the Cluster, and binds them when
//! the cluster's agent connects, which may be long after. A random block
//! was once met by another test running at the same time: that test's
//! proxy or one of its [`free_port`](crate::free_port)s held a port the
//! Cluster had been given, and the agent was refused ("cannot listen on
//! port 21893 for beta: Address already in use", seen in CI).
//!
//! So a block is reserved, not only picked: each of its ports holds an
//! exclusive lock on a file of its own under the temporary directory, for
//! as long as the [`PortBlock`] lives, across test processes too. The
//! kernel drops the locks when the process ends, however it ends. And
//! [`free_port`](crate::free_port) never picks a port in these blocks.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! let ports = e2e::pick_ports(20)?;
//! let flag = format!("--cluster-ports={}", ports.range());
//! # Ok(()) }
//! ```

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;

use anyhow::{Context, Result, bail};

/// Where blocks start: kube API ports in 20000..22000, their ks ports in
/// 30000..32000; both below Linux's ephemeral range (32768), so no
/// outgoing connection holds them.
pub(crate) const BLOCKS: Range<u16> = 20000..22000;
/// The proxy's ks port for a kube API port (`KS_OFFSET` in
/// `proxy/src/clusters/decide.rs`).
pub(crate) const KS_OFFSET: u16 = 10000;

/// A reserved block of kube API ports (and their ks ports): see the module
/// docs. The reservation ends when it drops.
#[derive(Debug)]
pub struct PortBlock {
    first: u16,
    width: u16,
    _locks: Vec<File>,
}

impl PortBlock {
    /// The first kube API port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The last kube API port.
    pub fn last(&self) -> u16 {
        self.first + self.width - 1
    }

    /// `FIRST-LAST`, the form of `--cluster-ports`.
    pub fn range(&self) -> String {
        format!("{}-{}", self.first, self.last())
    }
}

/// A block of `width` ports in 20000..22000 that no other live
/// [`PortBlock`] overlaps and that nothing listens on now (nor on their
/// ks ports): see the module docs.
pub fn pick_ports(width: u16) -> Result<PortBlock> {
    let span = BLOCKS.len() as u16;
    if width == 0 || width >= span {
        bail!(
            "a block of {width} cluster ports: ask for 1 to {}",
            span - 1
        );
    }
    let dir = std::env::temp_dir().join("tower-e2e-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut seed = crate::net::seed();
    for _ in 0..200 {
        seed = crate::net::xorshift(seed);
        let first = BLOCKS.start + (seed % u64::from(span - width)) as u16;
        if let Some(locks) = reserve(&dir, first, width)? {
            return Ok(PortBlock {
                first,
                width,
                _locks: locks,
            });
        }
    }
    bail!(
        "no free block of {width} ports in {}..{} after 200 tries: \
         are other test runs holding them? (locks in {})",
        BLOCKS.start,
        BLOCKS.end,
        dir.display()
    )
}

/// The locks of `first..first + width`, or None if another block holds
/// one of them or something listens on one of the ports.
fn reserve(dir: &std::path::Path, first: u16, width: u16) -> Result<Option<Vec<File>>> {
    let mut locks = Vec::with_capacity(usize::from(width));
    for port in first..first + width {
        let path = dir.join(port.to_string());
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the port lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => locks.push(file),
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let bindable = |p: u16| TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok();
        if !bindable(port) || !bindable(port + KS_OFFSET) {
            return Ok(None);
        }
    }
    Ok(Some(locks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_blocks_never_overlap_and_free_ports_stay_out() -> Result<()> {
        let blocks = (0..20)
            .map(|_| pick_ports(50))
            .collect::<Result<Vec<_>>>()?;
        let mut taken = std::collections::BTreeSet::new();
        for b in &blocks {
            for p in b.first()..=b.last() {
                assert!(taken.insert(p), "port {p} is in two live blocks");
            }
        }
        for _ in 0..1000 {
            let p = crate::free_port();
            assert!(
                !BLOCKS.contains(&p) && !BLOCKS.contains(&(p.wrapping_sub(KS_OFFSET))),
                "free_port picked {p}, a cluster port"
            );
        }
        Ok(())
    }

    #[test]
    fn a_dropped_block_is_free_again() -> Result<()> {
        let dir = std::env::temp_dir().join("tower-e2e-ports");
        let block = pick_ports(5)?;
        let first = block.first();
        assert!(reserve(&dir, first, 5)?.is_none(), "reserved twice");
        drop(block);
        // Free unless something else took it since: then some other port.
        if let Some(again) = reserve(&dir, first, 5)? {
            assert_eq!(again.len(), 5);
        }
        Ok(())
    }
}
