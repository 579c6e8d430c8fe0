//! The proxy's CA as everything uses it: the [`Authority`] that signs now,
//! the other CAs still (or already) trusted while a rotation runs, and the
//! previous CA that keeps signing serving certificates until it is dropped,
//! for clients that trust only it ([`super::rotation`]). Clones share
//! it; [`Ca::rotate`] changes it for all of them, [`Ca::subscribe`] wakes
//! whoever re-issues.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::CertificateParams;
use rustls_pki_types::CertificateDer;

use super::ca::{Authority, CaError, Issued, pem_of};
use super::rotation::Plan;

#[derive(Clone)]
pub struct Ca(Arc<Live>);

struct Live {
    state: RwLock<Arc<CaState>>,
    changes: tokio::sync::watch::Sender<u64>,
}

struct CaState {
    signer: Arc<Authority>,
    /// Trusted besides the signer (the next CA, or the previous one).
    others: Vec<CertificateDer<'static>>,
    /// Signs serving (and peer) certificates instead of the signer: the
    /// previous CA, until it is dropped.
    serving: Option<Arc<Authority>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after())
            .field("others", &self.state().others.len())
            .finish_non_exhaustive()
    }
}

impl From<Authority> for Ca {
    fn from(signer: Authority) -> Self {
        Ca(Arc::new(Live {
            state: RwLock::new(Arc::new(CaState {
                signer: Arc::new(signer),
                others: Vec::new(),
                serving: None,
            })),
            changes: tokio::sync::watch::Sender::new(0),
        }))
    }
}

impl From<Plan> for Ca {
    fn from(plan: Plan) -> Self {
        let ca = Ca::from(plan.signer);
        let mut state = ca.0.state.write().unwrap_or_else(|e| e.into_inner());
        *state = Arc::new(CaState {
            signer: state.signer.clone(),
            others: plan.others,
            serving: plan.serving.map(Arc::new),
        });
        drop(state);
        ca
    }
}

impl Ca {
    /// [`Authority::load`], alone.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, CaError> {
        Authority::load(cert_pem, key_pem).map(Ca::from)
    }

    /// [`Authority::generate`], alone.
    pub fn generate() -> Result<Ca, CaError> {
        Authority::generate().map(Ca::from)
    }

    fn state(&self) -> Arc<CaState> {
        self.0
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The CA that signs now.
    pub fn signer(&self) -> Arc<Authority> {
        self.state().signer.clone()
    }

    /// The signing CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.signer().cert_pem().to_string()
    }

    /// The signing CA's certificate, DER.
    #[cfg(test)]
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.signer().cert_der().clone()
    }

    /// The signing CA's key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.signer().key_pem().to_string()
    }

    /// When the signing CA expires.
    pub fn not_after(&self) -> SystemTime {
        self.signer().not_after()
    }

    /// Every trusted CA certificate, PEM, the signer first: what clients
    /// trust (kubeconfig `certificate-authority-data`, the APIService's
    /// `caBundle`). It differs in every rotation phase, so kubeconfigs
    /// holding it are rewritten at each.
    pub fn bundle_pem(&self) -> String {
        let state = self.state();
        let mut out = state.signer.cert_pem().to_string();
        for der in &state.others {
            out.push_str(&pem_of(der));
        }
        out
    }

    /// Every trusted CA certificate, DER, the signer first: the roots for
    /// client certificates.
    pub fn trusted(&self) -> Vec<CertificateDer<'static>> {
        let state = self.state();
        std::iter::once(state.signer.cert_der().clone())
            .chain(state.others.iter().cloned())
            .collect()
    }

    /// Bumped by every [`Ca::rotate`] that changed something.
    pub fn generation(&self) -> u64 {
        *self.0.changes.borrow()
    }

    /// Wakes after each change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// Sign and trust as `plan` says from now on. False when that is what
    /// is in use already.
    pub fn rotate(&self, plan: Plan) -> bool {
        let mut state = self.0.state.write().unwrap_or_else(|e| e.into_inner());
        if state.signer.cert_der() == plan.signer.cert_der()
            && state.others == plan.others
            && state.serving.as_ref().map(|s| s.cert_der())
                == plan.serving.as_ref().map(|s| s.cert_der())
        {
            return false;
        }
        *state = Arc::new(CaState {
            signer: Arc::new(plan.signer),
            others: plan.others,
            serving: plan.serving.map(Arc::new),
        });
        drop(state);
        self.0.changes.send_modify(|g| *g = g.wrapping_add(1));
        true
    }

    /// What signs serving and peer certificates: the previous CA while it
    /// is trusted and its key given, else the signer.
    fn server_signer(&self) -> Arc<Authority> {
        let state = self.state();
        state
            .serving
            .clone()
            .unwrap_or_else(|| state.signer.clone())
    }

    /// A serving certificate ([`Authority::issue_server`]) that every client
    /// of this rotation step validates.
    pub fn issue_server(&self, sans: &[String], validity: Duration) -> Result<Issued, CaError> {
        self.server_signer().issue_server(sans, validity)
    }

    /// A replica's certificate ([`Authority::issue_peer`]), signed as
    /// [`Ca::issue_server`]: replicas a step behind still trust it.
    pub fn issue_peer(&self, sans: &[String], validity: Duration) -> Result<Issued, CaError> {
        self.server_signer().issue_peer(sans, validity)
    }

    /// [`Authority::issue_client`] by the signer (the listeners trust every
    /// CA of the rotation step).
    pub fn issue_client(
        &self,
        common_name: &str,
        organizations: &[&str],
        validity: Duration,
    ) -> Result<Issued, CaError> {
        self.signer()
            .issue_client(common_name, organizations, validity)
    }

    /// [`Authority::sign`] by the signer.
    pub fn sign(
        &self,
        params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<(String, SystemTime), CaError> {
        self.signer().sign(params, public_key, validity)
    }
}
