//! Several proxy replicas (`--leader-elect`): who writes ([`leader`]), who
//! serves which cluster ([`owners`]), and the port replicas relay clients to
//! each other through ([`peers`]).

pub mod leader;
pub mod owners;
pub mod peers;
