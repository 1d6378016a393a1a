//! backup --wait with the real operator (the stand-in kubelet plays the backup Job),
//! and the backups on the status screen.

use dchat_operator::api::{DchatCluster, Phase};
use kube::ResourceExt;

use crate::plugin::{dchat, ok};
use crate::support::kubelet::{default_fate, job_name, Fate};
use crate::support::{observed, Env};

const SPEC: &str = "version: '1.0'\nbackup: {destination: {s3: {bucket: dchat-backups, prefix: prod, region: eu-west-1}}, schedule: '0 3 * * *'}";

fn manifest(backup: &str) -> String {
    serde_json::json!({
        "formatVersion": 1, "namespace": "ns", "cluster": "chat", "backup": backup,
        "location": format!("s3://dchat-backups/prod/ns/chat/{backup}/data.dchat"),
        "sizeBytes": 4096, "sha256": "9f86d081884c7d65",
        "counts": {"messages": 12, "tombstones": 3, "profiles": 2, "memberships": 5},
        "relayVersion": "1.0", "storeKind": "embedded"
    })
    .to_string()
}

fn backups_succeed(pod: &k8s_openapi::api::core::v1::Pod) -> Fate {
    match job_name(pod) {
        Some(job) if job.contains("-backup-") => {
            let backup = pod
                .labels()
                .get("dchat.network/backup")
                .cloned()
                .unwrap_or_default();
            Fate::Exit(0, manifest(&backup))
        }
        _ => default_fate(pod),
    }
}

fn running(c: &DchatCluster) -> bool {
    observed(c) && c.status.as_ref().is_some_and(|s| s.phase == Phase::Running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_waits_until_completed_and_status_lists_it() {
    let Some(env) = Env::shared("plugin-backup").await else {
        return;
    };
    env.kubelet.set_policy(backups_succeed);
    let operator = env.operator().await;
    env.apply_cluster("plain", "version: '1.0'").await.unwrap();
    let run = dchat(&env, &["backup", "plain"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("has no spec.backup: set a destination first"),
        "{}",
        run.stderr
    );

    env.apply_cluster("chat", SPEC).await.unwrap();
    env.wait_cluster("chat", "Running", running).await;
    let run = dchat(&env, &["backup", "chat", "--wait", "--timeout", "2m"]).await;
    ok(&run);
    let first = run.stdout.lines().next().unwrap_or_default().to_string();
    let prefix = format!("dchatbackup {}/chat-", env.ns);
    assert!(
        first.starts_with(&prefix) && first.ends_with(" created"),
        "{}",
        run.stdout
    );
    let name = first
        .trim_start_matches(&format!("dchatbackup {}/", env.ns))
        .trim_end_matches(" created")
        .to_string();
    assert!(
        run.stdout.ends_with(&format!(
            "done: Completed, 4.0 KiB at s3://dchat-backups/prod/ns/chat/{name}/data.dchat\n"
        )),
        "{}",
        run.stdout
    );

    env.wait_cluster("chat", "the backup in status", |c| {
        c.status
            .as_ref()
            .and_then(|s| s.backup.as_ref())
            .and_then(|b| b.last_successful_backup.as_deref())
            == Some(name.as_str())
    })
    .await;
    let status = dchat(&env, &["status", "chat"]).await;
    ok(&status);
    let screen = &status.stdout;
    assert!(
        screen.contains("  schedule     \"0 3 * * *\" UTC, next in "),
        "{screen}"
    );
    assert!(
        screen.contains(&format!("  last success {name} (")),
        "{screen}"
    );
    assert!(
        screen.contains(&format!("  {name}  Completed  ")),
        "{screen}"
    );
    assert!(screen.contains("4.0 KiB"), "{screen}");
    let json = dchat(&env, &["status", "chat", "-o", "json"]).await;
    let summary: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(summary["backups"]["recent"][0]["phase"], "Completed");
    assert!(
        summary["backups"]["nextScheduledAt"].is_string(),
        "{summary}"
    );

    // Without --wait: created, and how to watch it.
    let run = dchat(&env, &["backup", "chat"]).await;
    ok(&run);
    assert!(
        run.stdout
            .contains("watch it: kubectl get dchatbackup chat-"),
        "{}",
        run.stdout
    );
    operator.assert_no_refusals();
}
