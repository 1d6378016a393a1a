//! Running the operator: leader election around the controller, the way `dchat-operator
//! run` does it. The binary adds only what a process needs (configuration, signals, the
//! HTTP endpoints); tests start the same [`run`] in-process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;
use tracing::info;

use crate::controller;
use crate::leader::LeaderElector;
use crate::metrics::Metrics;

/// How long a leader's Lease lasts without renewal; a standby takes over after it.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// Selects rustls's ring provider for the whole process.
///
/// kube's TLS stack asks rustls for the process-wide provider, and rustls can only pick
/// one by itself when exactly one is compiled in. Test builds link a second one (through
/// dev-dependencies), so without this every client construction panicked there. Calling
/// it more than once is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The operator's client for `config`, its every request counted in
/// `dchat_operator_kube_requests_total`.
pub fn counted_client(config: kube::Config, metrics: &Metrics) -> Result<Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&metrics.kube_requests_layer())
        .build())
}

/// Leader election settings of one operator replica.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease (the operator's own).
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// How long the Lease lasts without renewal.
    pub lease_duration: Duration,
}

/// What one operator replica runs with.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace to watch, or every namespace.
    pub namespace: Option<String>,
    /// This replica's identity in the Lease and in Events.
    pub identity: String,
    /// Leader election, or `None` for a single replica.
    pub leader_election: Option<LeaderElection>,
    /// How often API discovery is asked which optional kinds are served.
    pub discovery_interval: Duration,
}

/// Why the operator stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Another replica may lead now; a restart campaigns afresh.
    #[error("lost the leader lease {namespace}/{name}; exiting so a fresh replica can campaign")]
    LostLease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
    },
}

/// Runs the operator until `shutdown` resolves: waits for the Lease when leader election
/// is on, then runs the controller while renewing it. Returns an error when the Lease
/// was lost, because then another replica may already be reconciling.
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let elector = options.leader_election.as_ref().map(|le| {
        Arc::new(LeaderElector::new(
            client.clone(),
            &le.lease_namespace,
            &le.lease_name,
            &options.identity,
            le.lease_duration,
        ))
    });
    if let Some(elector) = &elector {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = stopped(stop_rx.clone()) => return Ok(()),
        }
    }

    info!(
        namespace = options.namespace.as_deref().unwrap_or("<all>"),
        identity = %options.identity,
        "starting controller"
    );
    let lost_lease = Arc::new(AtomicBool::new(false));
    if let Some(keeper) = elector.clone() {
        let lost = lost_lease.clone();
        let stop = stop_tx.clone();
        let rx = stop_rx.clone();
        // Renewal runs beside the controller; losing the lease stops the controller.
        tokio::spawn(async move {
            tokio::select! {
                _ = keeper.keep() => {
                    lost.store(true, Ordering::Relaxed);
                    let _ = stop.send(true);
                }
                _ = stopped(rx) => {}
            }
        });
    }
    controller::run(
        client,
        options.namespace.clone(),
        metrics,
        Some(options.identity.clone()),
        options.discovery_interval,
        stopped(stop_rx),
    )
    .await;
    if let (true, Some(le)) = (lost_lease.load(Ordering::Relaxed), &options.leader_election) {
        return Err(RunError::LostLease {
            namespace: le.lease_namespace.clone(),
            name: le.lease_name.clone(),
        });
    }
    if let Some(elector) = &elector {
        elector.release().await;
    }
    Ok(())
}
