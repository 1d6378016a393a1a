//! One operator replica, in-process but on a runtime of its own, so that "kill" drops
//! every task it started (controller, lease renewal, discovery) at once, as a SIGKILL
//! would, without a graceful release of anything.

use std::sync::Arc;
use std::time::Duration;

use dchat_operator::metrics::Metrics;
use dchat_operator::runner::{self, LeaderElection, Options, RunError};
use kube::client::ClientBuilder;
use kube::Config;
use tokio::sync::oneshot;

use super::rbac::{Refusals, RELEASE_NAMESPACE};

/// How often the test operators ask discovery (the binary: every 30 s).
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);

/// How one replica runs.
#[derive(Clone, Debug)]
pub struct Replica {
    /// Namespace it watches.
    pub namespace: String,
    /// Its identity.
    pub identity: String,
    /// The Lease it campaigns for, in the release namespace; `None` runs it alone.
    pub lease: Option<String>,
}

/// A running replica.
pub struct RunningOperator {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    finished: Option<oneshot::Receiver<Result<(), RunError>>>,
    /// Its metrics (reconcile counts).
    pub metrics: Arc<Metrics>,
    /// Requests the API server refused it.
    pub refusals: Refusals,
}

impl RunningOperator {
    /// Starts a replica that authenticates with `config` (the chart's ServiceAccount).
    pub fn start(config: Config, replica: Replica) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("operator-{}", replica.identity))
            .enable_all()
            .build()
            .expect("an operator runtime");
        let metrics = Arc::new(Metrics::new());
        let refusals = Refusals::default();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        let options = Options {
            namespace: Some(replica.namespace.clone()),
            identity: replica.identity.clone(),
            leader_election: replica.lease.map(|name| LeaderElection {
                lease_namespace: RELEASE_NAMESPACE.to_string(),
                lease_name: name,
                lease_duration: runner::LEASE_DURATION,
            }),
            discovery_interval: DISCOVERY_INTERVAL,
        };
        let (m, r) = (metrics.clone(), refusals.clone());
        runtime.spawn(async move {
            let client = ClientBuilder::try_from(config)
                .expect("an operator client")
                .with_layer(&r)
                .with_layer(&m.kube_requests_layer())
                .build();
            let result = runner::run(client, options, m, async move {
                let _ = stop_rx.await;
            })
            .await;
            let _ = done_tx.send(result);
        });
        Self {
            runtime: Some(runtime),
            stop: Some(stop_tx),
            finished: Some(done_rx),
            metrics,
            refusals,
        }
    }

    /// Reconciles so far.
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }

    /// Reconciles that have finished (the duration histogram's count).
    pub fn reconciles_finished(&self) -> u64 {
        let text = self.metrics.encode().unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("dchat_operator_reconcile_duration_seconds_count"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Its requests so far that write (every verb but get, list and watch), from
    /// `dchat_operator_kube_requests_total`: "verb resource" → count.
    pub fn writes(&self) -> std::collections::BTreeMap<String, u64> {
        self.requests(|verb| !["get", "list", "watch"].contains(&verb))
    }

    /// Its list requests so far (watches not counted): "list resource" → count.
    pub fn lists(&self) -> std::collections::BTreeMap<String, u64> {
        self.requests(|verb| verb == "list")
    }

    /// Its requests so far whose verb `counts`, from `dchat_operator_kube_requests_total`:
    /// "verb resource" → count.
    fn requests(&self, counts: impl Fn(&str) -> bool) -> std::collections::BTreeMap<String, u64> {
        let text = self.metrics.encode().unwrap_or_default();
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("dchat_operator_kube_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            let verb = label("verb");
            if !counts(&verb) {
                continue;
            }
            *out.entry(format!("{verb} {}", label("resource")))
                .or_default() += value.parse::<u64>().unwrap_or(0);
        }
        out
    }

    /// Waits until at least one more reconcile than `before` has finished.
    pub async fn wait_reconciled_after(&self, before: u64) {
        super::wait_for("a reconcile to finish", || async {
            (self.reconciles_finished() > before).then_some(())
        })
        .await;
    }

    /// Stops it as SIGKILL would: nothing is released, no request is finished.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Asks it to stop (SIGTERM) and waits until it did; returns how it ended.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let finished = self.finished.take().expect("not stopped before");
        let result = tokio::time::timeout(Duration::from_secs(30), finished)
            .await
            .expect("the operator stops within 30 s")
            .expect("the operator task reports how it ended");
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        result
    }

    /// Whether the replica's run ended by itself (e.g. it lost its Lease).
    pub fn has_exited(&mut self) -> Option<Result<(), String>> {
        let finished = self.finished.as_mut()?;
        match finished.try_recv() {
            Ok(result) => Some(result.map_err(|e| e.to_string())),
            Err(_) => None,
        }
    }

    /// Fails the test when the API server refused any of its requests.
    pub fn assert_no_refusals(&self) {
        let refused = self.refusals.all();
        assert!(
            refused.is_empty(),
            "the chart's RBAC refused the operator: {refused:#?}"
        );
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
