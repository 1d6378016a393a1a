//! Prometheus Operator objects: a ServiceMonitor scraping the relays and a PrometheusRule
//! with the relay alerts. Built only when the monitoring.coreos.com CRDs exist.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::api::DchatCluster;
use crate::backup::cron::Cron;
use crate::labels::{self, Component, SLOT_LABEL};

/// Where the alert runbooks live; each alert links to its page.
pub const RUNBOOK_BASE: &str = "https://github.com/dchat/dchat-operator/blob/main/docs/runbooks";

/// Relay counter of frames answered with an error, by error code.
pub const METRIC_REJECTED_FRAMES: &str = "dchat_rejected_frames_total";
/// Relay counter of messages routed (accepted for delivery), by kind.
pub const METRIC_ROUTED_MESSAGES: &str = "dchat_messages_routed_total";
/// Relay histogram of delivery latency in seconds.
pub const METRIC_DELIVERY_LATENCY: &str = "dchat_delivery_latency_seconds";
/// The operator's counter of finished backups (`{cluster, result}`).
pub const METRIC_BACKUPS: &str = "dchat_operator_backups_total";
/// The operator's gauge of a cluster's newest Completed backup time.
pub const METRIC_LAST_BACKUP: &str = "dchat_operator_backup_last_success_timestamp_seconds";

/// The subset of the Prometheus Operator's ServiceMonitor the operator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "ServiceMonitor",
    namespaced,
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Services to scrape.
    pub selector: LabelSelector,
    /// Ports to scrape on those Services.
    pub endpoints: Vec<ScrapeEndpoint>,
}

/// One scrape endpoint of a ServiceMonitor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScrapeEndpoint {
    /// Service port name.
    pub port: String,
    /// HTTP path.
    pub path: String,
    /// Scrape interval.
    pub interval: String,
}

/// The subset of the Prometheus Operator's PrometheusRule the operator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "PrometheusRule",
    namespaced,
    schema = "disabled",
    derive = "PartialEq"
)]
pub struct PrometheusRuleSpec {
    /// Rule groups.
    pub groups: Vec<RuleGroup>,
}

/// A named group of alerting rules.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RuleGroup {
    /// Group name.
    pub name: String,
    /// Alerts in the group.
    pub rules: Vec<AlertRule>,
}

/// One alerting rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AlertRule {
    /// Alert name.
    pub alert: String,
    /// PromQL condition.
    pub expr: String,
    /// How long the condition must hold.
    #[serde(rename = "for")]
    pub for_: String,
    /// Labels, including severity.
    pub labels: BTreeMap<String, String>,
    /// Summary, description and runbook URL.
    pub annotations: BTreeMap<String, String>,
}

/// The ServiceMonitor `<name>`, scraping both slots' headless Services, or `None` when
/// `spec.monitoring.serviceMonitor` is off.
pub fn service_monitor(cluster: &DchatCluster) -> Option<ServiceMonitor> {
    let spec = &cluster.spec.monitoring;
    if !spec.service_monitor {
        return None;
    }
    let mut selector = labels::cluster_selector(cluster);
    selector.insert(
        "app.kubernetes.io/component".to_string(),
        "relay".to_string(),
    );
    Some(ServiceMonitor {
        metadata: labels::child_meta(
            cluster,
            labels::cluster_object_name(cluster),
            labels::labels(cluster, Component::Monitoring),
        ),
        spec: ServiceMonitorSpec {
            // Only the per-slot headless Services carry the slot label, so each relay is
            // scraped once, through its own slot's Service.
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: SLOT_LABEL.to_string(),
                        operator: "Exists".to_string(),
                        values: None,
                    },
                ]),
            },
            endpoints: vec![ScrapeEndpoint {
                port: "metrics".to_string(),
                path: "/metrics".to_string(),
                interval: spec.interval.clone(),
            }],
        },
    })
}

/// The PrometheusRule `<name>` with the relay alerts, or `None` when
/// `spec.monitoring.prometheusRule` is off.
pub fn prometheus_rule(cluster: &DchatCluster) -> Option<PrometheusRule> {
    if !cluster.spec.monitoring.prometheus_rule {
        return None;
    }
    let name = labels::cluster_object_name(cluster);
    let namespace = cluster.metadata.namespace.as_deref().unwrap_or("default");
    let scope = format!(r#"namespace="{namespace}",service=~"{name}-(blue|green)-headless""#);
    let alert =
        |alert: &str, expr: String, for_: &str, severity: &str, summary: String, runbook: &str| {
            AlertRule {
                alert: alert.to_string(),
                expr,
                for_: for_.to_string(),
                // `namespace` and `dchat_cluster` on every alert, whatever its query
                // keeps (a `sum` keeps no labels; the backup alerts read the operator's
                // metrics, scraped in the operator's namespace): Alertmanager groups and
                // inhibits by these two (docs/monitoring/alertmanager.yaml).
                labels: BTreeMap::from([
                    ("severity".to_string(), severity.to_string()),
                    ("namespace".to_string(), namespace.to_string()),
                    ("dchat_cluster".to_string(), name.clone()),
                ]),
                annotations: BTreeMap::from([
                    ("summary".to_string(), summary),
                    (
                        "runbook_url".to_string(),
                        format!("{RUNBOOK_BASE}/{runbook}.md"),
                    ),
                ]),
            }
        };
    let rules = vec![
        alert(
            "DchatRelayDown",
            format!("up{{{scope}}} == 0"),
            "5m",
            "critical",
            format!("A relay of dchat cluster {namespace}/{name} is down"),
            "relay-crash-loop",
        ),
        alert(
            "DchatRelayHighErrorRate",
            format!(
                "sum(rate({METRIC_REJECTED_FRAMES}{{{scope}}}[5m])) / clamp_min(sum(rate({METRIC_ROUTED_MESSAGES}{{{scope}}}[5m])) + sum(rate({METRIC_REJECTED_FRAMES}{{{scope}}}[5m])), 0.001) > 0.05"
            ),
            "10m",
            "warning",
            format!("More than 5% of frames rejected by dchat cluster {namespace}/{name}"),
            "relay-errors",
        ),
        alert(
            "DchatRelayHighLatency",
            format!(
                "histogram_quantile(0.99, sum by (le) (rate({METRIC_DELIVERY_LATENCY}_bucket{{{scope}}}[5m]))) > 0.5"
            ),
            "10m",
            "warning",
            format!("p99 delivery latency of dchat cluster {namespace}/{name} above 500ms"),
            "relay-latency",
        ),
    ];
    let mut groups = vec![RuleGroup {
        name: format!("dchat-{namespace}-{name}"),
        rules,
    }];
    if let Some(backup) = &cluster.spec.backup {
        // The operator's own metrics (scraped through its chart's ServiceMonitor).
        let selector = format!(r#"cluster="{namespace}/{name}""#);
        let mut rules = vec![alert(
            "DchatBackupFailed",
            format!("increase({METRIC_BACKUPS}{{{selector},result=\"failed\"}}[1h]) > 0"),
            "0m",
            "warning",
            format!("A backup of dchat cluster {namespace}/{name} failed in the last hour"),
            "backup-failed",
        )];
        let every = backup
            .schedule
            .as_deref()
            .and_then(|s| s.parse::<Cron>().ok())
            .and_then(|cron| crate::backup::health::interval(&cron));
        if let Some(every) = every {
            rules.push(alert(
                "DchatBackupTooOld",
                format!(
                    "time() - {METRIC_LAST_BACKUP}{{{selector}}} > {}",
                    2 * every.as_secs()
                ),
                "15m",
                "critical",
                format!(
                    "No backup of dchat cluster {namespace}/{name} completed within twice its schedule's interval"
                ),
                "backup-failed",
            ));
        }
        groups.push(RuleGroup {
            name: format!("dchat-{namespace}-{name}-backups"),
            rules,
        });
    }
    Some(PrometheusRule {
        metadata: labels::child_meta(
            cluster,
            name.clone(),
            labels::labels(cluster, Component::Monitoring),
        ),
        spec: PrometheusRuleSpec { groups },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn service_monitor_scrapes_metrics_port_at_interval() {
        let sm = service_monitor(&cluster_from_yaml(
            "version: '1'\nmonitoring: {interval: 15s}",
        ))
        .unwrap();
        assert_eq!(sm.metadata.name.as_deref(), Some("chat"));
        let endpoint = &sm.spec.endpoints[0];
        assert_eq!(endpoint.port, "metrics");
        assert_eq!(endpoint.path, "/metrics");
        assert_eq!(endpoint.interval, "15s");
        let labels = sm.spec.selector.match_labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/instance"], "chat");
        assert_eq!(
            sm.spec.selector.match_expressions.unwrap()[0].key,
            "dchat.network/slot"
        );
    }

    #[test]
    fn switches_turn_objects_off() {
        let cluster = cluster_from_yaml(
            "version: '1'\nmonitoring: {serviceMonitor: false, prometheusRule: false}",
        );
        assert!(service_monitor(&cluster).is_none());
        assert!(prometheus_rule(&cluster).is_none());
    }

    #[test]
    fn rule_has_the_relay_alerts_with_runbooks() {
        let rule = prometheus_rule(&cluster_from_yaml("version: '1'")).unwrap();
        let alerts = &rule.spec.groups[0].rules;
        let names: Vec<&str> = alerts.iter().map(|a| a.alert.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "DchatRelayDown",
                "DchatRelayHighErrorRate",
                "DchatRelayHighLatency"
            ]
        );
        for alert in alerts {
            assert!(alert.expr.contains(r#"namespace="apps""#), "{}", alert.expr);
            assert!(alert.annotations["runbook_url"].starts_with(RUNBOOK_BASE));
            assert!(alert.labels.contains_key("severity"));
            assert_eq!(alert.labels["namespace"], "apps");
            assert_eq!(alert.labels["dchat_cluster"], "chat");
        }
        assert!(alerts[0].expr.starts_with("up{"));
        assert!(alerts[2]
            .expr
            .contains("dchat_delivery_latency_seconds_bucket"));
    }

    #[test]
    fn backups_add_their_alerts() {
        let rule = prometheus_rule(&cluster_from_yaml(
            "version: '1'\nbackup: {destination: {s3: {bucket: bkt, region: eu-west-1}}, schedule: '0 */6 * * *'}",
        ))
        .unwrap();
        let group = &rule.spec.groups[1];
        let names: Vec<&str> = group.rules.iter().map(|a| a.alert.as_str()).collect();
        assert_eq!(names, ["DchatBackupFailed", "DchatBackupTooOld"]);
        for alert in &group.rules {
            // The operator's series carry the operator's namespace; the alert must not.
            assert_eq!(alert.labels["namespace"], "apps", "{}", alert.alert);
        }
        assert!(
            group.rules[0]
                .expr
                .contains(r#"cluster="apps/chat",result="failed""#),
            "{}",
            group.rules[0].expr
        );
        assert!(
            group.rules[1].expr.ends_with("> 43200"),
            "{}",
            group.rules[1].expr
        );
        let on_demand = prometheus_rule(&cluster_from_yaml(
            "version: '1'\nbackup: {destination: {s3: {bucket: bkt, region: eu-west-1}}}",
        ))
        .unwrap();
        assert_eq!(
            on_demand.spec.groups[1].rules.len(),
            1,
            "no schedule, no age alert"
        );
        let source = include_str!("../metrics.rs");
        for metric in [METRIC_BACKUPS, METRIC_LAST_BACKUP] {
            let registered = metric
                .trim_start_matches("dchat_operator_")
                .trim_end_matches("_total");
            assert!(source.contains(&format!("\"{registered}\"")), "{metric}");
        }
    }

    /// The alerts query metrics the relay really exports: each name must be registered
    /// in the relay's metrics module (prefix `dchat_`, counters get `_total`).
    #[test]
    fn alert_metrics_exist_in_the_relay() {
        let source = include_str!("../../../relay/src/metrics.rs");
        for metric in [
            METRIC_REJECTED_FRAMES,
            METRIC_ROUTED_MESSAGES,
            METRIC_DELIVERY_LATENCY,
        ] {
            let registered = metric
                .trim_start_matches("dchat_")
                .trim_end_matches("_total");
            assert!(
                source.contains(&format!("\"{registered}\"")),
                "{metric} is not registered in relay/src/metrics.rs"
            );
        }
        assert!(source.contains("Registry::with_prefix(\"dchat\")"));
    }
}
