//! Reading the proxy's `--audit-log` file in tests.

use std::path::Path;

use k8s_openapi::serde_json::{self, Value};

/// The audit file's lines, parsed (a line being written is skipped; no file
/// yet is no lines).
pub fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
