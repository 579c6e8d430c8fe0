//! Self-registration: a member joins by itself with a Kubernetes bootstrap
//! token, as Clusternet's agents do, instead of a person creating its
//! Cluster and copying its token (`docs/registration.md`).
//!
//! 1. The agent, with no cluster token, sends `BootstrapToken` and
//!    `ClusterID` (its `kube-system` UID) in `config`.
//! 2. The door ([`admit`]) checks the token against its Secret in the
//!    host's `kube-system` ([`bootstrap`]) and records the request as a
//!    `ClusterRegistrationRequest` ([`crd`]), approved at once when the
//!    Secret says so, else refused "pending" until a person decides.
//! 3. The leader ([`controller`]) makes (or finds, by cluster ID) the
//!    Cluster for an approved request; the Cluster controller gives it a
//!    token.
//! 4. The door admits the agent for one thing: [`deliver`] hands it the
//!    token over the tunnel. The agent stores it and joins like any other.
//!
//! Every decision is in [`decide`] (and [`bootstrap`]), pure and tested.

pub mod admit;
pub mod bootstrap;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod deliver;
