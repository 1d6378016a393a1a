//! Which optional kinds the API server serves.
//!
//! ServiceMonitor and PrometheusRule exist only where the Prometheus Operator's CRDs are
//! installed (not on kind, not on most development clusters). The operator asks API
//! discovery instead of listing them and reading a 404: the API server answers a request
//! for an unserved group with a plain-text `404 page not found`, not a `Status`, which a
//! client cannot tell apart from other failures. Discovery runs once before the first
//! reconcile and again every [`DISCOVERY_INTERVAL`]; when the answer changes, every
//! cluster is reconciled, so CRDs installed later get their objects without a restart.

use std::sync::RwLock;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

pub use crate::build::OptionalKinds;

/// How often the operator asks discovery again.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// The group/version the Prometheus Operator serves its kinds under.
const MONITORING_GROUP_VERSION: &str = "monitoring.coreos.com/v1";

/// The last discovery answer, shared by every reconcile.
#[derive(Debug, Default)]
pub struct Capabilities {
    kinds: RwLock<Option<OptionalKinds>>,
}

impl Capabilities {
    /// Capabilities fixed at `kinds` (tests, and `render`); never discovered.
    pub fn fixed(kinds: OptionalKinds) -> Self {
        Self {
            kinds: RwLock::new(Some(kinds)),
        }
    }

    /// The last answer, or `None` before the first discovery.
    pub fn get(&self) -> Option<OptionalKinds> {
        *self.kinds.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an answer; true when it differs from the previous one.
    pub fn set(&self, kinds: OptionalKinds) -> bool {
        let mut current = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != Some(kinds);
        *current = Some(kinds);
        changed
    }

    /// Records that `kind` stopped being served (a request for it answered 404 between
    /// two discoveries, e.g. its CRD was deleted).
    pub fn forget(&self, kind: &str) {
        let mut current = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        if let Some(kinds) = current.as_mut() {
            *kinds = kinds.without(kind);
        }
    }
}

/// Asks the API server which optional kinds it serves. The group list first: asking for
/// an unserved group version answers a plain-text 404 (which kube logs as a warning).
pub async fn discover(client: &Client) -> Result<OptionalKinds, kube::Error> {
    let groups = client.list_api_groups().await?;
    let served = groups.groups.iter().any(|g| {
        g.versions
            .iter()
            .any(|v| v.group_version == MONITORING_GROUP_VERSION)
    });
    if !served {
        return Ok(OptionalKinds::NONE);
    }
    match client
        .list_api_group_resources(MONITORING_GROUP_VERSION)
        .await
    {
        Ok(list) => Ok(OptionalKinds::from_monitoring_resources(
            list.resources.iter().map(|r| r.name.as_str()),
        )),
        // Removed between the two requests. The body is plain text: only the code says it.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(OptionalKinds::NONE),
        Err(e) => Err(e),
    }
}

/// Whether the API server serves the DchatBackup kind (its CRD is installed: Helm
/// installs CRDs only on first install, so an upgrade may lack it).
pub async fn serves_backups(client: &Client) -> Result<bool, kube::Error> {
    let group_version = format!("{}/{}", crate::api::GROUP, crate::api::VERSION);
    let groups = client.list_api_groups().await?;
    let served = groups
        .groups
        .iter()
        .any(|g| g.versions.iter().any(|v| v.group_version == group_version));
    if !served {
        return Ok(false);
    }
    match client.list_api_group_resources(&group_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "dchatbackups")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Asks discovery every `interval` and records the answer; counts up `changes` when it
/// differs from the last one. Runs until every receiver is dropped.
pub async fn keep_discovering(
    client: Client,
    capabilities: std::sync::Arc<Capabilities>,
    interval: Duration,
    changes: watch::Sender<u64>,
) {
    loop {
        match discover(&client).await {
            Ok(kinds) => {
                let before = capabilities.get();
                if capabilities.set(kinds) {
                    if before.is_some() {
                        info!(?kinds, "the optional kinds the API server serves changed");
                    }
                    changes.send_modify(|n| *n += 1);
                    if changes.is_closed() {
                        return;
                    }
                }
            }
            // Keep the last answer: an API server that does not answer now is no news
            // about which CRDs are installed.
            Err(e) => warn!(error = %e, "API discovery failed; keeping the last answer"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_report_changes_and_forget_kinds() {
        let caps = Capabilities::default();
        assert_eq!(caps.get(), None);
        assert!(caps.set(OptionalKinds::ALL));
        assert!(!caps.set(OptionalKinds::ALL), "same answer is no change");
        caps.forget("ServiceMonitor");
        assert_eq!(
            caps.get(),
            Some(OptionalKinds {
                service_monitor: false,
                prometheus_rule: true
            })
        );
        assert!(caps.set(OptionalKinds::ALL), "back again is a change");
    }
}
