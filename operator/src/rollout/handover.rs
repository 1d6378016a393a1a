//! The handover Job (embedded store): before the old slot scales to zero, `dchat
//! handover` from the new relay image quiesces each old relay and streams its snapshot
//! into the new relay of the same ordinal (the embedded store runs one relay per slot),
//! through the relays' admin API on the metrics port. Stored messages for offline users
//! therefore survive the slot switch; see docs/rollouts.md.

use kube::ResourceExt;

use super::smoke::{tool_job, tool_labels, ToolJob};
use super::HandoverRequest;
use crate::api::{DchatCluster, Slot};
use crate::build::configmap::METRICS_PORT;
use crate::build::statefulset::admin_token_env;
use crate::labels;

/// Value of `app.kubernetes.io/name` on the handover Job and its pod; the relays'
/// NetworkPolicy lets pods with it (and the cluster's instance label) reach the
/// admin port.
pub const HANDOVER_APP_NAME: &str = "dchat-handover";
/// Pod attempts beyond the first: every step of a handover is idempotent, so a retry
/// after a lost node or a network blip is safe.
const BACKOFF_LIMIT: i32 = 3;
/// Time `dchat handover` allows each step (quiesce, snapshot, import).
const STEP_TIMEOUT: &str = "10m";
/// Hard limit for the whole Job; a hanging handover fails instead of stalling.
const ACTIVE_DEADLINE_SECONDS: i64 = 3600;

/// Admin URL of a slot's first relay, through the slot's headless Service (which
/// publishes not-ready pods, so a quiesced relay stays reachable).
pub fn admin_url(cluster: &DchatCluster, slot: Slot) -> String {
    format!(
        "http://{}-0.{}.{}.svc:{METRICS_PORT}",
        labels::statefulset_name(cluster, slot),
        labels::headless_service_name(cluster, slot),
        cluster.namespace().unwrap_or_else(|| "default".into())
    )
}

/// The handover Job for a rollout attempt.
pub fn handover_job(
    cluster: &DchatCluster,
    request: &HandoverRequest,
) -> k8s_openapi::api::batch::v1::Job {
    tool_job(
        cluster,
        ToolJob {
            name: request.job_name.clone(),
            labels: tool_labels(
                cluster,
                HANDOVER_APP_NAME,
                "handover",
                &request.version,
                request.to,
            ),
            container: "handover",
            version: &request.version,
            command: vec![
                "/usr/local/bin/dchat".into(),
                "handover".into(),
                "--from".into(),
                admin_url(cluster, request.from),
                "--to".into(),
                admin_url(cluster, request.to),
                "--timeout".into(),
                STEP_TIMEOUT.into(),
            ],
            env: vec![admin_token_env(cluster)],
            backoff_limit: BACKOFF_LIMIT,
            active_deadline_seconds: ACTIVE_DEADLINE_SECONDS,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn job_runs_dchat_handover_from_old_to_new_relay_with_the_admin_token() {
        let cluster = cluster_from_yaml("version: '1.5.0'\nimage: registry.example/relay");
        let request = HandoverRequest {
            job_name: "chat-handover-0123456789".into(),
            from: Slot::Blue,
            to: Slot::Green,
            version: "1.5.0".into(),
        };
        let job = handover_job(&cluster, &request);
        assert_eq!(
            job.metadata.name.as_deref(),
            Some("chat-handover-0123456789")
        );
        assert_eq!(
            job.metadata.owner_references.as_ref().unwrap()[0].kind,
            "DchatCluster"
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(3));
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(pod_labels["app.kubernetes.io/name"], "dchat-handover");
        assert_eq!(pod_labels["app.kubernetes.io/instance"], "chat");
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/relay:1.5.0"));
        assert_eq!(
            c.command.clone().unwrap(),
            vec![
                "/usr/local/bin/dchat",
                "handover",
                "--from",
                "http://chat-blue-0.chat-blue-headless.apps.svc:9090",
                "--to",
                "http://chat-green-0.chat-green-headless.apps.svc:9090",
                "--timeout",
                "10m"
            ]
        );
        let env = c.env.clone().unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].name, "DCHAT_ADMIN_TOKEN");
        let secret = env[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(secret.name, "chat-admin-token");
        assert_eq!(secret.key, "token");
        // The token never appears in the Job spec itself.
        assert!(env[0].value.is_none());
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
    }
}
