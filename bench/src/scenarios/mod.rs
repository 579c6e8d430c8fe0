//! One module per scenario; each adds its figures to the report and records
//! what it could not measure instead of failing the run.

pub mod bulk;
pub mod concurrency;
pub mod controlplane;
pub mod kubectl;
pub mod scale;
pub mod small;
pub mod startup;
pub mod wan;

/// Scenario names for `BENCH_ONLY`, in run order.
pub const ALL: &[&str] = &[
    "bulk",
    "small",
    "concurrency",
    "wan",
    "wan-lossy",
    "wan-stalled",
    "kubectl",
    "setup",
    "scale",
    "controlplane",
];
