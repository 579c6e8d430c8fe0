//! [`CrStore`]: the registry's view of the Cluster resources. Tokens come
//! from the controller's cache; ports open before an agent hears success;
//! session changes trigger a reconcile, the HA holder records and a status
//! refresh (damped while an agent flaps: [`super::damp`]); refused agents
//! become Events on their Cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc;

use super::crd::Cluster;
use super::damp::Damper;
use super::events::{Recorder, publish};
use super::service::Addresses;
use super::status::Kick;
use super::{Options, Ports, decide};
use crate::agents::hub;
use crate::agents::store::ClusterStore;
use crate::ha::owners::Owners;

/// The serving certificate names reconcile last computed per cluster (it
/// knows the ClusterIP and LB address), so connecting agents get them too.
pub type Names = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// How long an agent that connects before the Cluster cache has synced
/// waits for it: refused instead, every agent of a restarted proxy's fleet
/// that came back in its first second backed off (126 of 1,000 at once).
const SYNC_WAIT: Duration = Duration::from_secs(30);

/// How long an agent waits for its cluster's ports to be assigned, and how
/// often it looks ([`CrStore::assigned_ports`]).
const PORTS_WAIT: Duration = Duration::from_secs(30);
const PORTS_POLL: Duration = Duration::from_millis(200);

pub struct CrStore<P> {
    pub(super) store: Store<Cluster>,
    pub(super) names: Names,
    pub(super) recorder: Recorder,
    pub(super) trigger: mpsc::UnboundedSender<ObjectRef<Cluster>>,
    pub(super) ports: Arc<P>,
    pub(super) options: Options,
    pub(super) owners: Option<Arc<Owners>>,
    pub(super) kick: Kick,
    /// At most one pass and refresh per cluster a second while its agent flaps.
    pub(super) damper: Arc<Damper>,
    /// True once the Cluster cache has synced ([`super::readiness`]).
    pub(super) synced: tokio::sync::watch::Receiver<bool>,
}

impl<P: Ports> ClusterStore for CrStore<P> {
    async fn synced(&self) {
        // Past the deadline (or with the cache's writer gone) the agent is
        // judged on what the cache holds, as before it waited.
        let mut synced = self.synced.clone();
        let _ = tokio::time::timeout(SYNC_WAIT, synced.wait_for(|s| *s)).await;
    }

    fn token(&self, cluster: &str) -> Option<String> {
        let obj = self.store.get(&ObjectRef::new(cluster))?;
        (obj.is_served() && !obj.spec.connection.token.is_empty())
            .then(|| obj.spec.connection.token.clone())
    }

    fn grace(&self, cluster: &str) -> Option<crate::agents::grace::Grace> {
        let obj = self.store.get(&ObjectRef::new(cluster))?;
        let annotations = obj.metadata.annotations.as_ref()?;
        super::rotation::grace(
            annotations,
            &obj.spec.connection.token,
            jiff::Timestamp::now(),
        )
    }

    fn hub_services(&self, cluster: &str) -> Option<Vec<String>> {
        let obj = self.store.get(&ObjectRef::new(cluster))?;
        let list = obj.metadata.annotations.as_ref()?.get(hub::ANNOTATION)?;
        Some(hub::parse_opt_in(list))
    }

    async fn on_connect(&self, cluster: &str) -> Result<(), String> {
        if self.options.path_form.is_some() {
            // `--cluster-ports none`: the access port serves it already.
            return self
                .store
                .get(&ObjectRef::new(cluster))
                .map(|_| ())
                .ok_or_else(|| format!("cluster {cluster} not found"));
        }
        let (kube, ks) = self.assigned_ports(cluster).await?;
        let cached = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .cloned();
        let sans = cached.unwrap_or_else(|| {
            decide::sans(
                cluster,
                &self.options.namespace,
                self.options.advertise_address.as_deref(),
                &Addresses::default(),
            )
        });
        self.ports.open(cluster, kube, ks, &sans).await
    }

    fn on_reject(&self, cluster: &str, reason: &str) {
        // Only for clusters that exist: anyone can send any name.
        if let Some(obj) = self.store.get(&ObjectRef::new(cluster)) {
            let note = format!("an agent was refused: {reason}");
            publish(
                &self.recorder,
                &obj,
                EventType::Warning,
                "AgentRejected",
                note,
            );
        }
    }

    fn on_change(&self, cluster: &str) {
        // Other replicas relay to this one by these records: never damped.
        if let Some(owners) = &self.owners {
            owners.sessions_changed();
        }
        let (trigger, kick, name) = (self.trigger.clone(), self.kick.clone(), cluster.to_string());
        self.damper
            .follow(cluster, move || follow_up(&trigger, &kick, &name));
    }
}

/// What a change of `cluster`'s sessions is followed up by: the leader's
/// pass (its conditions) and a refresh of what the member says.
fn follow_up(trigger: &mpsc::UnboundedSender<ObjectRef<Cluster>>, kick: &Kick, cluster: &str) {
    let _ = trigger.send(ObjectRef::new(cluster));
    kick.notify(cluster);
}

impl<P: Ports> CrStore<P> {
    /// The cluster's ports as the cache has them. An agent that comes
    /// before the leader assigned them (a new Cluster, a fleet at a fresh
    /// proxy) waits, bounded by [`PORTS_WAIT`]: refused, it backed off up to
    /// `--max-retry-interval` (2 minutes). The cache is polled rather than
    /// the leader asked: in HA the leader may be another replica, and its
    /// write reaches every replica through the cache.
    async fn assigned_ports(&self, cluster: &str) -> Result<(u16, u16), String> {
        let deadline = tokio::time::Instant::now() + PORTS_WAIT;
        let mut asked = false;
        loop {
            let obj = self
                .store
                .get(&ObjectRef::new(cluster))
                .ok_or_else(|| format!("cluster {cluster} not found"))?;
            let conn = &obj.spec.connection;
            if let (Ok(kube), Ok(ks)) = (
                u16::try_from(conn.kubernetes_api_server_port),
                u16::try_from(conn.kubesphere_api_server_port),
            ) && kube != 0
                && ks != 0
            {
                return Ok((kube, ks));
            }
            if !asked {
                // Its pass may not even be queued yet (a new Cluster).
                let _ = self.trigger.send(ObjectRef::new(cluster));
                asked = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("the cluster's ports are not assigned yet, retry shortly".into());
            }
            tokio::time::sleep(PORTS_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher;

    use super::*;
    use crate::clusters::crd::{ClusterSpec, Connection};
    use crate::clusters::status::Kicks;

    /// Records what the store asks of the ports.
    #[derive(Default)]
    struct FakePorts(Mutex<Vec<Opened>>);

    /// (cluster, kube port, ks port, certificate names).
    type Opened = (String, u16, u16, Vec<String>);

    impl Ports for FakePorts {
        async fn open(
            &self,
            cluster: &str,
            kube: u16,
            ks: u16,
            sans: &[String],
        ) -> Result<(), String> {
            let mut opened = self.0.lock().unwrap();
            opened.push((cluster.to_string(), kube, ks, sans.to_vec()));
            Ok(())
        }

        async fn close(&self, _cluster: &str) {}
    }

    fn cluster(name: &str, token: &str, ports: (i32, i32), served: bool) -> Cluster {
        Cluster::new(
            name,
            ClusterSpec {
                join_federation: served,
                connection: Connection {
                    kind: "proxy".into(),
                    token: token.into(),
                    kubernetes_api_server_port: ports.0,
                    kubesphere_api_server_port: ports.1,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    struct Setup {
        store: CrStore<FakePorts>,
        triggers: mpsc::UnboundedReceiver<ObjectRef<Cluster>>,
        kicks: Kicks,
    }

    fn setup(clusters: Vec<Cluster>) -> Setup {
        let (reader, mut writer) = kube::runtime::reflector::store::<Cluster>();
        for c in clusters {
            writer.apply_watcher_event(&watcher::Event::Apply(c));
        }
        over(reader)
    }

    /// A store over `reader`, whose writer the caller may keep.
    fn over(reader: Store<Cluster>) -> Setup {
        let reader_for_sync = reader.clone();
        // Never contacted: events of these tests only go to refused agents
        // of clusters that exist, and the tests do not wait for them.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let recorder = Recorder::new(
            client,
            kube::runtime::events::Reporter {
                controller: "test".into(),
                instance: None,
            },
        );
        let (trigger, triggers) = mpsc::unbounded_channel();
        let (kick, kicks) = Kick::new();
        let store = CrStore {
            store: reader,
            names: Names::default(),
            recorder,
            trigger,
            ports: Arc::new(FakePorts::default()),
            options: Options {
                namespace: "kubesphere-system".into(),
                advertise_address: Some("192.168.100.3".into()),
                selector: vec![],
                ports: 16000..16010,
                bind_host: "127.0.0.1".into(),
                path_form: None,
                status_update_frequency: std::time::Duration::from_secs(60),
            },
            owners: None,
            kick,
            damper: Arc::default(),
            synced: crate::clusters::readiness::watch_sync(reader_for_sync),
        };
        Setup {
            store,
            triggers,
            kicks,
        }
    }

    #[tokio::test]
    async fn tokens_only_of_served_clusters_that_have_one() {
        let s = setup(vec![
            cluster("alpha", "t1", (16000, 26000), true),
            cluster("beta", "t2", (16001, 26001), false),
            cluster("gamma", "", (0, 0), true),
        ]);
        assert_eq!(s.store.token("alpha").as_deref(), Some("t1"));
        assert_eq!(s.store.token("beta"), None, "not served");
        assert_eq!(s.store.token("gamma"), None, "no token yet");
        assert_eq!(s.store.token("delta"), None, "unknown");
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_hears_success_only_once_its_ports_are_open() {
        let s = setup(vec![
            cluster("alpha", "t1", (16000, 26000), true),
            cluster("gamma", "t3", (0, 0), true),
        ]);
        s.store.on_connect("alpha").await.unwrap();
        {
            let opened = s.store.ports.0.lock().unwrap();
            let (name, kube, ks, sans) = &opened[0];
            assert_eq!((name.as_str(), *kube, *ks), ("alpha", 16000, 26000));
            // Before any reconcile: the names known without the Service.
            assert!(sans.contains(&"mc-alpha.kubesphere-system.svc".to_string()));
            assert!(sans.contains(&"192.168.100.3".to_string()));
        }
        // Names reconcile learnt (a ClusterIP) are used from then on.
        s.store
            .names
            .lock()
            .unwrap()
            .insert("alpha".into(), vec!["10.96.0.10".into()]);
        s.store.on_connect("alpha").await.unwrap();
        assert_eq!(s.store.ports.0.lock().unwrap()[1].3, ["10.96.0.10"]);

        // (Refused only after PORTS_WAIT: see the test below.)
        let e = s.store.on_connect("delta").await.unwrap_err();
        assert!(e.contains("not found"), "{e}");
        assert_eq!(s.store.ports.0.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_comes_before_its_ports_are_assigned_waits_for_them() {
        let (reader, mut writer) = kube::runtime::reflector::store::<Cluster>();
        writer.apply_watcher_event(&watcher::Event::Apply(cluster("gamma", "t3", (0, 0), true)));
        let mut s = over(reader);
        let mut early = Box::pin(s.store.on_connect("gamma"));
        assert!(futures_util::poll!(&mut early).is_pending());
        // It asked for the cluster's pass.
        assert_eq!(s.triggers.recv().await.unwrap().name, "gamma");
        assert!(s.store.ports.0.lock().unwrap().is_empty());
        // The leader's write reaches the cache: the agent is let in.
        let assigned = cluster("gamma", "t3", (16002, 26002), true);
        writer.apply_watcher_event(&watcher::Event::Apply(assigned));
        early.await.unwrap();
        let opened = s.store.ports.0.lock().unwrap().clone();
        assert_eq!((opened[0].1, opened[0].2), (16002, 26002));

        // Never assigned: refused once the wait is over, saying why.
        writer.apply_watcher_event(&watcher::Event::Apply(cluster("delta", "t4", (0, 0), true)));
        let start = tokio::time::Instant::now();
        let e = s.store.on_connect("delta").await.unwrap_err();
        assert!(e.contains("not assigned yet"), "{e}");
        assert!(start.elapsed() >= PORTS_WAIT);
    }

    #[tokio::test]
    async fn an_agent_that_comes_before_the_cache_synced_waits_for_it() {
        let (reader, mut writer) = kube::runtime::reflector::store::<Cluster>();
        let s = over(reader);
        let mut early = Box::pin(async {
            s.store.synced().await;
            s.store.token("alpha")
        });
        // Judged now it would be refused as unknown, and back off.
        assert!(futures_util::poll!(&mut early).is_pending());
        writer.apply_watcher_event(&watcher::Event::Init);
        let alpha = cluster("alpha", "t1", (16000, 26000), true);
        writer.apply_watcher_event(&watcher::Event::InitApply(alpha));
        assert!(futures_util::poll!(&mut early).is_pending(), "listing");
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(early.await.as_deref(), Some("t1"));
    }

    #[tokio::test(start_paused = true)]
    async fn every_agent_that_came_before_the_sync_is_let_in_with_it() {
        let (reader, mut writer) = kube::runtime::reflector::store::<Cluster>();
        let store = Arc::new(over(reader).store);
        let start = tokio::time::Instant::now();
        // Each agent waits in its own task (kube's own wait wakes only the last).
        let waiting: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.synced().await })
            })
            .collect();
        tokio::task::yield_now().await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        for agent in waiting {
            agent.await.unwrap();
        }
        // With the sync, not at their deadline (15 of 16 did, before).
        assert!(start.elapsed() < SYNC_WAIT, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_session_change_reconciles_and_refreshes_the_status() {
        let mut s = setup(vec![cluster("alpha", "t1", (16000, 26000), true)]);
        s.store.on_change("alpha");
        assert_eq!(s.triggers.recv().await.unwrap().name, "alpha");
        assert_eq!(s.kicks.recv().await.as_deref(), Some("alpha"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_agent_is_followed_up_once_a_second_the_last_change_too() {
        let mut s = setup(vec![cluster("alpha", "t1", (16000, 26000), true)]);
        let start = tokio::time::Instant::now();
        // Connect, and at once: the pass and the refresh.
        s.store.on_change("alpha");
        assert_eq!(s.triggers.recv().await.unwrap().name, "alpha");
        assert_eq!(s.kicks.recv().await.as_deref(), Some("alpha"));
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Nine more changes within the second: one follow-up, when it ends.
        for _ in 0..9 {
            tokio::time::advance(Duration::from_millis(50)).await;
            s.store.on_change("alpha");
        }
        assert!(s.triggers.try_recv().is_err(), "damped");
        assert_eq!(s.triggers.recv().await.unwrap().name, "alpha");
        assert_eq!(s.kicks.recv().await.as_deref(), Some("alpha"));
        assert_eq!(start.elapsed(), crate::clusters::damp::INTERVAL);
        // Then quiet: nothing more is asked.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(s.triggers.try_recv().is_err());
        assert!(futures_util::poll!(Box::pin(s.kicks.recv())).is_pending());
        // Another cluster is not held back by alpha's flapping.
        s.store.on_change("alpha");
        s.store.on_change("alpha");
        s.store.on_change("beta");
        let firsts = [
            s.triggers.recv().await.unwrap(),
            s.triggers.recv().await.unwrap(),
        ];
        assert_eq!(firsts.map(|r| r.name), ["alpha", "beta"]);
    }

    #[tokio::test]
    async fn a_change_outside_a_runtime_is_followed_up_at_once() {
        let mut s = setup(vec![cluster("alpha", "t1", (16000, 26000), true)]);
        s.store.on_change("alpha");
        assert_eq!(s.triggers.recv().await.unwrap().name, "alpha");
        // A session dropped as its runtime shuts down: nothing to wait on.
        let store = Arc::new(s.store);
        let dropped = store.clone();
        std::thread::spawn(move || dropped.on_change("alpha"))
            .join()
            .unwrap();
        assert_eq!(s.triggers.try_recv().unwrap().name, "alpha");
        // And the damper is not left waiting for a follow-up that never comes.
        let later = tokio::time::Instant::now() + crate::clusters::damp::INTERVAL;
        assert_eq!(
            store.damper.change("alpha", later),
            crate::clusters::damp::Step::Now
        );
    }
}
