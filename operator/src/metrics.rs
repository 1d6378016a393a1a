//! Operator metrics, served on `/metrics`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::Phase;

/// Label of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Stable error category, from `Error::metric_label`.
    pub category: String,
}

/// Label of the clusters-by-phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Phase name.
    pub phase: String,
}

/// Labels of the per-cluster backup metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    /// `namespace/name` of the DchatCluster.
    pub cluster: String,
}

/// Labels of the per-cluster day-2 metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// `namespace/name` of the DchatCluster.
    pub cluster: String,
}

/// Labels of the backups counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupResultLabels {
    /// `namespace/name` of the DchatCluster.
    pub cluster: String,
    /// `completed` or `failed`.
    pub result: String,
}

/// The operator's metrics and the registry that encodes them.
pub struct Metrics {
    /// `dchat_operator_reconciles_total`.
    pub reconciles: Counter,
    /// `dchat_operator_reconcile_errors_total{category}`.
    pub errors: Family<ErrorLabels, Counter>,
    /// `dchat_operator_reconcile_duration_seconds`.
    pub duration: Histogram,
    /// `dchat_operator_clusters{phase}`.
    pub clusters: Family<PhaseLabels, Gauge>,
    /// `dchat_operator_backups_total{cluster,result}`: backups that finished.
    pub backups: Family<BackupResultLabels, Counter>,
    /// `dchat_operator_backup_duration_seconds`: from a backup's Job start to its end.
    pub backup_duration: Histogram,
    /// `dchat_operator_backup_last_success_timestamp_seconds{cluster}`.
    pub backup_last_success: Family<BackupLabels, Gauge>,
    /// `dchat_operator_backup_size_bytes{cluster}`: the newest Completed backup.
    pub backup_size: Family<BackupLabels, Gauge>,
    /// `dchat_operator_cluster_paused{cluster}`: 1 while reconciliation of the cluster is
    /// paused; no series otherwise.
    pub paused: Family<ClusterLabels, Gauge>,
    /// Last phase of each cluster, to keep the gauge exact.
    phases: Mutex<HashMap<String, Phase>>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dchat_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let clusters = Family::<PhaseLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            duration.clone(),
        );
        registry.register("clusters", "DchatClusters by phase", clusters.clone());
        let backups = Family::<BackupResultLabels, Counter>::default();
        let backup_duration = Histogram::new([
            10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
        ]);
        let backup_last_success = Family::<BackupLabels, Gauge>::default();
        let backup_size = Family::<BackupLabels, Gauge>::default();
        registry.register(
            "backups",
            "DchatBackups that finished, by cluster and result (completed, failed)",
            backups.clone(),
        );
        registry.register(
            "backup_duration_seconds",
            "Time from a backup's Job start to its end",
            backup_duration.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When the newest Completed backup of a cluster was taken (Unix seconds)",
            backup_last_success.clone(),
        );
        registry.register(
            "backup_size_bytes",
            "Size of the newest Completed backup of a cluster",
            backup_size.clone(),
        );
        let paused = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "cluster_paused",
            "1 while reconciliation of a cluster is paused (spec.paused or the dchat.network/reconcile annotation)",
            paused.clone(),
        );
        for phase in Phase::ALL {
            clusters
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .set(0);
        }
        Self {
            reconciles,
            errors,
            duration,
            clusters,
            backups,
            backup_duration,
            backup_last_success,
            backup_size,
            paused,
            phases: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// Counts a failed reconcile.
    pub fn record_error(&self, category: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                category: category.to_string(),
            })
            .inc();
    }

    /// Starts timing a reconcile; the time is recorded when the guard drops, whichever
    /// way the reconcile ends.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.duration,
        }
    }

    /// Records the phase of a cluster.
    pub fn set_phase(&self, cluster: &str, phase: Phase) {
        // A poisoned lock only means another reconcile panicked mid-update; the map is
        // still usable.
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        phases.insert(cluster.to_string(), phase);
        self.refresh(&phases);
    }

    /// Forgets a deleted cluster.
    pub fn forget(&self, cluster: &str) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        phases.remove(cluster);
        self.refresh(&phases);
        let labels = BackupLabels {
            cluster: cluster.to_string(),
        };
        self.backup_last_success.remove(&labels);
        self.backup_size.remove(&labels);
        self.set_paused(cluster, false);
    }

    /// Records whether reconciliation of `cluster` is paused.
    pub fn set_paused(&self, cluster: &str, paused: bool) {
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        if paused {
            self.paused.get_or_create(&labels).set(1);
        } else {
            self.paused.remove(&labels);
        }
    }

    /// Counts a finished backup of `cluster` and how long it took.
    pub fn record_backup(&self, cluster: &str, completed: bool, took: Option<std::time::Duration>) {
        self.backups
            .get_or_create(&BackupResultLabels {
                cluster: cluster.to_string(),
                result: if completed { "completed" } else { "failed" }.to_string(),
            })
            .inc();
        if let Some(took) = took {
            self.backup_duration.observe(took.as_secs_f64());
        }
    }

    /// Records the newest Completed backup of `cluster` (time in Unix seconds, size).
    pub fn set_last_backup(&self, cluster: &str, taken_at: i64, size: Option<u64>) {
        let labels = BackupLabels {
            cluster: cluster.to_string(),
        };
        self.backup_last_success
            .get_or_create(&labels)
            .set(taken_at);
        if let Some(size) = size {
            self.backup_size
                .get_or_create(&labels)
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
    }

    fn refresh(&self, phases: &HashMap<String, Phase>) {
        for phase in Phase::ALL {
            let count = phases.values().filter(|p| **p == phase).count();
            self.clusters
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().to_string(),
                })
                .set(count as i64);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_metric() {
        let metrics = Metrics::new();
        metrics.reconciles.inc();
        metrics.record_error("conflict");
        drop(metrics.reconcile_timer());
        metrics.set_phase("apps/a", Phase::Running);
        metrics.set_phase("apps/b", Phase::Running);
        metrics.set_phase("apps/b", Phase::Degraded);
        let text = metrics.encode().unwrap();
        assert!(text.contains("dchat_operator_reconciles_total 1"), "{text}");
        assert!(text.contains(r#"dchat_operator_reconcile_errors_total{category="conflict"} 1"#));
        assert!(text.contains("dchat_operator_reconcile_duration_seconds_count 1"));
        assert!(text.contains(r#"dchat_operator_clusters{phase="Running"} 1"#));
        assert!(text.contains(r#"dchat_operator_clusters{phase="Degraded"} 1"#));
        metrics.set_paused("apps/b", true);
        let text = metrics.encode().unwrap();
        assert!(text.contains(r#"dchat_operator_cluster_paused{cluster="apps/b"} 1"#));
        metrics.forget("apps/b");
        let text = metrics.encode().unwrap();
        assert!(text.contains(r#"dchat_operator_clusters{phase="Degraded"} 0"#));
        assert!(!text.contains(r#"dchat_operator_cluster_paused{cluster="apps/b"}"#));
    }
}
