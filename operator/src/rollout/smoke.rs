//! The smoke test Job: `dchat smoke` from the new relay image against the preview
//! Service, which selects the slot under test. A message to itself must round-trip.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::{JobState, SmokeRequest};
use crate::api::DchatCluster;
use crate::job_end;
use crate::labels;

/// UID the relay image's non-root user has; the smoke test runs as it too.
const RELAY_UID: i64 = 1000;
/// Port of the preview Service.
const PREVIEW_PORT: i32 = 7070;
/// Time `dchat smoke` allows for the round trip.
const ROUND_TRIP_TIMEOUT: &str = "20s";
/// Attempts before the Job fails: one retry absorbs a pod that lost its node.
const BACKOFF_LIMIT: i32 = 1;
/// The Job is killed after this long, so a hanging test fails rather than stalls.
const ACTIVE_DEADLINE_SECONDS: i64 = 300;
/// Finished Jobs (and their pods' logs) are kept this long for inspection.
const TTL_SECONDS_AFTER_FINISHED: i32 = 86_400;
/// Value of `app.kubernetes.io/name` on the smoke Job and its pod. Deliberately not the
/// relays' name, so no relay Service or NetworkPolicy selects the test pod.
pub const SMOKE_APP_NAME: &str = "dchat-smoke";

/// WebSocket URL of the preview Service, as the smoke pod reaches it.
pub fn preview_url(cluster: &DchatCluster) -> String {
    format!(
        "ws://{}.{}.svc:{PREVIEW_PORT}/v1/ws",
        labels::preview_service_name(cluster),
        cluster.namespace().unwrap_or_else(|| "default".into())
    )
}

/// Labels of a Job the rollout runs from the relay image (and of its pod).
pub(crate) fn tool_labels(
    cluster: &DchatCluster,
    app_name: &str,
    component: &str,
    version: &str,
    slot: crate::api::Slot,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), app_name.to_string()),
        ("app.kubernetes.io/instance".to_string(), cluster.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            labels::MANAGED_BY.to_string(),
        ),
        ("app.kubernetes.io/version".to_string(), version.to_string()),
        (labels::SLOT_LABEL.to_string(), slot.as_str().to_string()),
    ])
}

/// What differs between the Jobs a rollout runs from the relay image.
pub(crate) struct ToolJob<'a> {
    /// Job name.
    pub name: String,
    /// Job and pod labels.
    pub labels: BTreeMap<String, String>,
    /// Container name.
    pub container: &'a str,
    /// Relay version whose image runs the command.
    pub version: &'a str,
    /// Command line.
    pub command: Vec<String>,
    /// Environment.
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    /// Pod attempts beyond the first.
    pub backoff_limit: i32,
    /// The Job fails after this long.
    pub active_deadline_seconds: i64,
}

/// The smoke Job for a rollout attempt.
pub fn smoke_job(cluster: &DchatCluster, request: &SmokeRequest) -> Job {
    tool_job(
        cluster,
        ToolJob {
            name: request.job_name.clone(),
            labels: tool_labels(
                cluster,
                SMOKE_APP_NAME,
                "smoke-test",
                &request.version,
                request.slot,
            ),
            container: "smoke",
            version: &request.version,
            command: vec![
                "/usr/local/bin/dchat".into(),
                "smoke".into(),
                preview_url(cluster),
                "--timeout".into(),
                ROUND_TRIP_TIMEOUT.into(),
            ],
            env: Vec::new(),
            backoff_limit: BACKOFF_LIMIT,
            active_deadline_seconds: ACTIVE_DEADLINE_SECONDS,
        },
    )
}

/// A Job running one `dchat` command from the relay image, as the relay's non-root
/// user with a read-only root filesystem, on the relays' nodes and pull secrets.
pub(crate) fn tool_job(cluster: &DchatCluster, tool: ToolJob<'_>) -> Job {
    let job_labels = tool.labels;
    let limits = BTreeMap::from([
        ("cpu".to_string(), Quantity("200m".into())),
        ("memory".to_string(), Quantity("64Mi".into())),
    ]);
    Job {
        metadata: labels::child_meta(cluster, tool.name, job_labels.clone()),
        spec: Some(JobSpec {
            backoff_limit: Some(tool.backoff_limit),
            active_deadline_seconds: Some(tool.active_deadline_seconds),
            ttl_seconds_after_finished: Some(TTL_SECONDS_AFTER_FINISHED),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(job_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RELAY_UID),
                        run_as_group: Some(RELAY_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    image_pull_secrets: (!cluster.spec.pod.image_pull_secrets.is_empty()).then(
                        || {
                            cluster
                                .spec
                                .pod
                                .image_pull_secrets
                                .iter()
                                .map(|name| k8s_openapi::api::core::v1::LocalObjectReference {
                                    name: name.clone(),
                                })
                                .collect()
                        },
                    ),
                    node_selector: (!cluster.spec.pod.node_selector.is_empty())
                        .then(|| cluster.spec.pod.node_selector.clone()),
                    tolerations: (!cluster.spec.pod.tolerations.is_empty())
                        .then(|| cluster.spec.pod.tolerations.clone()),
                    containers: vec![Container {
                        name: tool.container.into(),
                        image: Some(format!("{}:{}", cluster.spec.image, tool.version)),
                        image_pull_policy: Some(
                            cluster.spec.image_pull_policy.as_str().to_string(),
                        ),
                        command: Some(tool.command),
                        env: (!tool.env.is_empty()).then_some(tool.env),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".to_string(), Quantity("50m".into())),
                                ("memory".to_string(), Quantity("32Mi".into())),
                            ])),
                            limits: Some(limits),
                            ..ResourceRequirements::default()
                        }),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Capabilities::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// Reads a Job's outcome ([`crate::job_end`]): a condition of either end, or a pod that
/// succeeded.
pub fn job_state(job: Option<&Job>) -> JobState {
    let Some(job) = job else {
        return JobState::Absent;
    };
    if job_end::true_condition(job, &job_end::SUCCEEDED).is_some() {
        return JobState::Succeeded;
    }
    if let Some(condition) = job_end::true_condition(job, &job_end::FAILED) {
        let why = [condition.reason.as_deref(), condition.message.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        return JobState::Failed(format!(
            "Job {} failed{}{} (see `kubectl logs job/{}`)",
            job.name_any(),
            if why.is_empty() { "" } else { ": " },
            why,
            job.name_any()
        ));
    }
    if job_end::pod_succeeded(job) {
        return JobState::Succeeded;
    }
    JobState::Running
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Slot;
    use crate::testing::cluster_from_yaml;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    fn request() -> SmokeRequest {
        SmokeRequest {
            job_name: "chat-smoke-0123456789".into(),
            slot: Slot::Green,
            version: "1.5.0".into(),
        }
    }

    #[test]
    fn job_runs_dchat_smoke_from_the_new_image_against_preview() {
        let cluster = cluster_from_yaml("version: '1.5.0'\nimage: registry.example/relay");
        let job = smoke_job(&cluster, &request());
        assert_eq!(job.metadata.name.as_deref(), Some("chat-smoke-0123456789"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("apps"));
        assert_eq!(
            job.metadata.owner_references.as_ref().unwrap()[0].kind,
            "DchatCluster"
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(1));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/relay:1.5.0"));
        assert_eq!(
            c.command.clone().unwrap(),
            vec![
                "/usr/local/bin/dchat",
                "smoke",
                "ws://chat-preview.apps.svc:7070/v1/ws",
                "--timeout",
                "20s"
            ]
        );
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        // Not a relay: no relay Service or the relays' NetworkPolicy may select it.
        assert_eq!(pod_labels["app.kubernetes.io/name"], "dchat-smoke");
        assert_eq!(pod_labels["app.kubernetes.io/managed-by"], "dchat-operator");
    }

    fn job_with(conditions: Vec<(&str, &str)>, succeeded: Option<i32>) -> Job {
        let cluster = cluster_from_yaml("version: '1'");
        let mut job = smoke_job(&cluster, &request());
        job.status = Some(JobStatus {
            succeeded,
            conditions: Some(
                conditions
                    .into_iter()
                    .map(|(t, s)| JobCondition {
                        type_: t.into(),
                        status: s.into(),
                        reason: Some("BackoffLimitExceeded".into()),
                        message: Some("Job has reached the specified backoff limit".into()),
                        ..JobCondition::default()
                    })
                    .collect(),
            ),
            ..JobStatus::default()
        });
        job
    }

    #[test]
    fn state_follows_job_conditions() {
        assert_eq!(job_state(None), JobState::Absent);
        assert_eq!(job_state(Some(&job_with(vec![], None))), JobState::Running);
        assert_eq!(
            job_state(Some(&job_with(vec![("Complete", "True")], Some(1)))),
            JobState::Succeeded
        );
        assert_eq!(
            job_state(Some(&job_with(vec![("Failed", "False")], None))),
            JobState::Running
        );
        match job_state(Some(&job_with(vec![("Failed", "True")], None))) {
            JobState::Failed(why) => {
                assert!(why.contains("BackoffLimitExceeded"), "{why}");
                assert!(
                    why.contains("kubectl logs job/chat-smoke-0123456789"),
                    "{why}"
                );
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }
}
