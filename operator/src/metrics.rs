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

/// Labels of the API request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    /// Kubernetes verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `apply`
    /// (server-side apply), `delete`, `deletecollection`.
    pub verb: String,
    /// `plural[.group][/subresource]`, e.g. `statefulsets.apps`,
    /// `dchatclusters.dchat.network/status`; `discovery` for the API discovery paths.
    pub resource: String,
    /// HTTP status of the answer, or `error` when none came (timeout, connection).
    pub code: String,
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
    /// `dchat_operator_kube_requests_total{verb,resource,code}`: the operator's requests
    /// to the API server, counted by [`KubeRequestsLayer`] on its client.
    pub kube_requests: Family<KubeRequestLabels, Counter>,
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
        let kube_requests = Family::<KubeRequestLabels, Counter>::default();
        registry.register(
            "kube_requests",
            "Requests to the Kubernetes API server, by verb, resource and answer \
             (a request the client retried counts once, with its last answer)",
            kube_requests.clone(),
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
            kube_requests,
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

    /// A client layer that counts every request in [`Self::kube_requests`].
    pub fn kube_requests_layer(&self) -> KubeRequestsLayer {
        KubeRequestsLayer {
            counter: self.kube_requests.clone(),
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

/// The verb and resource of a request to the API server, the way the API server names
/// them in its own `apiserver_request_total` (lower case, `apply` for server-side apply).
pub fn classify_request(
    method: &http::Method,
    uri: &http::Uri,
    content_type: Option<&str>,
) -> (String, String) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // After `/api/v1` or `/apis/GROUP/VERSION`: the group and the resource path.
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => ("", &[][..]),
    };
    // (resource, name, subresource)
    let target = match rest {
        [] => None,
        ["namespaces", _ns, resource, tail @ ..]
            if !matches!(*resource, "status" | "finalize") || !tail.is_empty() =>
        {
            Some((*resource, tail.first().copied(), tail.get(1).copied()))
        }
        [resource, tail @ ..] => Some((*resource, tail.first().copied(), tail.get(1).copied())),
    };
    let Some((resource, name, subresource)) = target else {
        let verb = method.as_str().to_ascii_lowercase();
        return (verb, "discovery".to_string());
    };
    let watch = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if name.is_some() => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH
            if content_type.is_some_and(|t| t.starts_with("application/apply-patch")) =>
        {
            "apply"
        }
        http::Method::PATCH => "patch",
        http::Method::DELETE if name.is_some() => "delete",
        http::Method::DELETE => "deletecollection",
        _ => return (method.as_str().to_ascii_lowercase(), resource.to_string()),
    };
    let mut label = resource.to_string();
    if !group.is_empty() {
        label.push('.');
        label.push_str(group);
    }
    if let Some(subresource) = subresource {
        label.push('/');
        label.push_str(subresource);
    }
    (verb.to_string(), label)
}

/// Counts the requests of a kube client (`ClientBuilder::with_layer`). It sits outside
/// the client's retry layer: a request retried after a 429 counts once.
#[derive(Clone)]
pub struct KubeRequestsLayer {
    counter: Family<KubeRequestLabels, Counter>,
}

impl<S> tower::Layer<S> for KubeRequestsLayer {
    type Service = KubeRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KubeRequests {
            inner,
            counter: self.counter.clone(),
        }
    }
}

/// The service [`KubeRequestsLayer`] wraps around a client's stack.
#[derive(Clone)]
pub struct KubeRequests<S> {
    inner: S,
    counter: Family<KubeRequestLabels, Counter>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for KubeRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<RB>, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (verb, resource) = classify_request(request.method(), request.uri(), content_type);
        let counter = self.counter.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(answer) => answer.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            counter
                .get_or_create(&KubeRequestLabels {
                    verb,
                    resource,
                    code,
                })
                .inc();
            response
        })
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

    fn classify(method: &str, uri: &str, content_type: Option<&str>) -> (String, String) {
        classify_request(
            &method.parse().unwrap(),
            &uri.parse().unwrap(),
            content_type,
        )
    }

    #[test]
    fn requests_are_named_like_the_api_server_names_them() {
        let cases = [
            (
                "GET",
                "/api/v1/namespaces/a/secrets/db",
                None,
                "get",
                "secrets",
            ),
            (
                "GET",
                "/api/v1/namespaces/a/services?labelSelector=x%3Dy",
                None,
                "list",
                "services",
            ),
            (
                "GET",
                "/apis/apps/v1/statefulsets?watch=true&resourceVersion=5",
                None,
                "watch",
                "statefulsets.apps",
            ),
            (
                "GET",
                "/apis/dchat.network/v1alpha1/dchatclusters?watch=1",
                None,
                "watch",
                "dchatclusters.dchat.network",
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/a/statefulsets/r-blue?fieldManager=x&force=true",
                Some("application/apply-patch+yaml"),
                "apply",
                "statefulsets.apps",
            ),
            (
                "PATCH",
                "/apis/dchat.network/v1alpha1/namespaces/a/dchatclusters/r/status",
                Some("application/merge-patch+json"),
                "patch",
                "dchatclusters.dchat.network/status",
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/a/events",
                Some("application/json"),
                "create",
                "events.events.k8s.io",
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/s/leases/l",
                None,
                "update",
                "leases.coordination.k8s.io",
            ),
            (
                "DELETE",
                "/apis/batch/v1/namespaces/a/jobs/j",
                None,
                "delete",
                "jobs.batch",
            ),
            (
                "DELETE",
                "/apis/batch/v1/namespaces/a/jobs?labelSelector=x",
                None,
                "deletecollection",
                "jobs.batch",
            ),
            ("GET", "/api/v1/namespaces", None, "list", "namespaces"),
            ("GET", "/api/v1/namespaces/a", None, "get", "namespaces"),
            (
                "PUT",
                "/api/v1/namespaces/a/finalize",
                None,
                "update",
                "namespaces/finalize",
            ),
            (
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x",
                None,
                "get",
                "customresourcedefinitions.apiextensions.k8s.io",
            ),
            (
                "GET",
                "/apis/monitoring.coreos.com/v1",
                None,
                "get",
                "discovery",
            ),
            ("GET", "/apis", None, "get", "discovery"),
            ("GET", "/api", None, "get", "discovery"),
        ];
        for (method, uri, content_type, verb, resource) in cases {
            assert_eq!(
                classify(method, uri, content_type),
                (verb.to_string(), resource.to_string()),
                "{method} {uri}"
            );
        }
    }

    #[tokio::test]
    async fn the_layer_counts_each_request_with_its_answer() {
        use tower::{Layer, Service, ServiceExt};
        let metrics = Metrics::new();
        let mut service = metrics.kube_requests_layer().layer(tower::service_fn(
            |request: http::Request<()>| async move {
                let status = if request.uri().path().ends_with("missing") {
                    404
                } else {
                    200
                };
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder().status(status).body(()).unwrap(),
                )
            },
        ));
        for path in [
            "/api/v1/namespaces/a/secrets/db",
            "/api/v1/namespaces/a/secrets/db",
            "/api/v1/namespaces/a/secrets/missing",
        ] {
            let request = http::Request::get(path).body(()).unwrap();
            service.ready().await.unwrap().call(request).await.unwrap();
        }
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                r#"dchat_operator_kube_requests_total{verb="get",resource="secrets",code="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"dchat_operator_kube_requests_total{verb="get",resource="secrets",code="404"} 1"#
            ),
            "{text}"
        );
    }
}
