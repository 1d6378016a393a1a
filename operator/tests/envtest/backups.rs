//! Backups on the real control plane: on-demand, failed, scheduled, retention, deletion.
//! The stand-in kubelet plays the backup Job's pod: it exits with the manifest (or an
//! error) as its termination message, as `dchat backup create` does.

use dchat_operator::api::{BackupPhase, DchatBackup, Phase};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;

use crate::support::kubelet::{default_fate, job_name, Fate};
use crate::support::{condition, running, wait_for, Env};

const SPEC: &str = "version: '1.0'\nbackup: {destination: {s3: {bucket: dchat-backups, prefix: prod, region: eu-west-1}}, retention: {maxAge: 1d, minKeep: 1}}";

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

/// Backup Job pods exit with a manifest; delete Job pods succeed; the rest as usual.
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

fn on_demand(name: &str) -> DchatBackup {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "dchat.network/v1alpha1", "kind": "DchatBackup",
        "metadata": {"name": name},
        "spec": {"cluster": {"name": "chat"}}
    }))
    .unwrap()
}

async fn wait_backup(env: &Env, name: &str, phase: BackupPhase) -> DchatBackup {
    let api: Api<DchatBackup> = env.api();
    wait_for(&format!("backup {name} {phase:?}"), || async {
        let b = api.get_opt(name).await.ok().flatten()?;
        (b.status.as_ref()?.phase == phase).then_some(b)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_backup_completes_and_shows_in_the_cluster() {
    let Some(env) = Env::shared("backup-on-demand").await else {
        return;
    };
    env.kubelet.set_policy(backups_succeed);
    let operator = env.operator().await;
    env.apply_cluster("chat", SPEC).await.unwrap();
    env.wait_cluster("chat", "Running", running).await;
    let before = env.cluster("chat").await;
    let healthy = condition(&before, "BackupHealthy").expect("BackupHealthy with spec.backup");
    assert_eq!(
        (healthy.status.as_str(), healthy.reason.as_str()),
        ("False", "NoBackupYet")
    );

    let backups: Api<DchatBackup> = env.api();
    backups
        .create(&PostParams::default(), &on_demand("manual"))
        .await
        .unwrap();
    let done = wait_backup(&env, "manual", BackupPhase::Completed).await;
    let status = done.status.unwrap();
    assert_eq!(status.size_bytes, Some(4096));
    assert_eq!(
        status.location.as_deref(),
        Some("s3://dchat-backups/prod/ns/chat/manual/data.dchat")
    );
    assert_eq!(status.counts.unwrap().messages, 12);
    assert!(status.completed_at.is_some() && status.started_at.is_some());

    // The Job: dchat backup create from the serving version's image, as the relays' identity.
    let jobs = env
        .api::<Job>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let job = jobs
        .iter()
        .find(|j| j.name_any().starts_with("manual-backup-"))
        .expect("the backup Job");
    let pod = job.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("chat-relay"));
    let command = pod.containers[0].command.clone().unwrap().join(" ");
    assert!(
        command.contains("backup create") && command.contains("--backup manual"),
        "{command}"
    );
    assert_eq!(job.owner_references()[0].kind, "DchatBackup");

    let cluster = env
        .wait_cluster("chat", "the backup in status", |c| {
            c.status
                .as_ref()
                .and_then(|s| s.backup.as_ref())
                .and_then(|b| b.last_successful_backup.as_deref())
                == Some("manual")
        })
        .await;
    assert_eq!(condition(&cluster, "BackupHealthy").unwrap().status, "True");
    operator.assert_no_refusals();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_job_fails_the_backup_and_the_health() {
    let Some(env) = Env::shared("backup-fails").await else {
        return;
    };
    env.kubelet.set_policy(|pod| match job_name(pod) {
        Some(job) if job.contains("-backup-") => Fate::Exit(
            1,
            r#"{"error":"AccessDenied: s3:PutObject on dchat-backups/prod"}"#.into(),
        ),
        _ => default_fate(pod),
    });
    let operator = env.operator().await;
    env.apply_cluster("chat", SPEC).await.unwrap();
    env.wait_cluster("chat", "Running", running).await;
    let backups: Api<DchatBackup> = env.api();
    backups
        .create(&PostParams::default(), &on_demand("doomed"))
        .await
        .unwrap();
    let failed = wait_backup(&env, "doomed", BackupPhase::Failed).await;
    let error = failed.status.unwrap().error.unwrap();
    assert!(error.contains("AccessDenied"), "{error}");
    env.wait_cluster("chat", "LastBackupFailed", |c| {
        condition(c, "BackupHealthy").is_some_and(|h| h.reason == "LastBackupFailed")
    })
    .await;
    operator.assert_no_refusals();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_creates_backups() {
    let Some(env) = Env::shared("backup-schedule").await else {
        return;
    };
    env.kubelet.set_policy(backups_succeed);
    let operator = env.operator().await;
    env.apply_cluster(
        "chat",
        &format!(
            "{}\n",
            SPEC.replace("retention:", "schedule: '* * * * *', retention:")
        ),
    )
    .await
    .unwrap();
    env.wait_cluster("chat", "Running", running).await;
    let backups: Api<DchatBackup> = env.api();
    let scheduled = wait_for("a scheduled backup", || async {
        let list = backups.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|b| b.name_any().starts_with("chat-2"))
    })
    .await;
    assert!(
        scheduled.owner_references().is_empty(),
        "backups outlive their cluster"
    );
    assert_eq!(scheduled.labels()["dchat.network/cluster"], "chat");
    wait_backup(&env, &scheduled.name_any(), BackupPhase::Completed).await;
    let cluster = env
        .wait_cluster(
            "chat",
            "the scheduled backup and the next time in status",
            |c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.backup.as_ref())
                    .is_some_and(|b| {
                        b.next_scheduled_at.is_some()
                            && b.last_schedule_time.is_some()
                            && b.last_successful_backup.is_some()
                    })
            },
        )
        .await;
    assert!(cluster
        .status
        .unwrap()
        .backup
        .unwrap()
        .last_successful_backup
        .is_some());
    operator.assert_no_refusals();
}

/// Retention deletes an old backup's data (its delete Job) and then the object; the
/// newest stays. Deleting the cluster keeps its backups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_backups_and_backups_outlive_the_cluster() {
    let Some(env) = Env::shared("backup-retention").await else {
        return;
    };
    env.kubelet.set_policy(backups_succeed);
    // Three finished backups from before the operator started. With maxAge 1d and
    // minKeep 1, only one with more than one newer Completed backup goes: "old".
    let backups: Api<DchatBackup> = env.api();
    for (name, age_days) in [("old", 10), ("mid", 5), ("recent", 0)] {
        backups
            .create(&PostParams::default(), &on_demand(name))
            .await
            .unwrap();
        let completed_at = (k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_hours(24 * age_days))
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
        backups
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {
                    "phase": "Completed", "completedAt": completed_at,
                    "location": format!("s3://dchat-backups/prod/ns/chat/{name}/data.dchat"),
                    "sizeBytes": 1
                }})),
            )
            .await
            .unwrap();
    }
    let operator = env.operator().await;
    env.apply_cluster("chat", SPEC).await.unwrap();
    env.wait_cluster("chat", "Running", running).await;
    wait_for("the old backup pruned", || async {
        backups.get_opt("old").await.ok()?.is_none().then_some(())
    })
    .await;
    // Its data went first: the delete Job ran (it went with the object, which owned it).
    let events: Api<k8s_openapi::api::events::v1::Event> = env.api();
    let said: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("old"))
        .filter_map(|e| e.reason)
        .collect();
    assert!(said.contains(&"DataDeleted".to_string()), "{said:?}");
    assert!(
        backups.get_opt("recent").await.unwrap().is_some(),
        "the newest stays"
    );
    assert!(
        backups.get_opt("mid").await.unwrap().is_some(),
        "old enough, but not more than minKeep newer backups exist"
    );

    env.clusters()
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the cluster gone", || async {
        env.clusters()
            .get_opt("chat")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        backups.get_opt("recent").await.unwrap().is_some(),
        "deleting a cluster keeps its backups"
    );
    operator.assert_no_refusals();
}

/// `dchat-operator backup NAME --wait`: creates the DchatBackup, waits, exit 0 when it
/// completed; exit 1 naming the error when it failed; exit 1 for a cluster without
/// spec.backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_command_waits_for_the_result() {
    let Some(env) = Env::shared("backup-command").await else {
        return;
    };
    env.kubelet.set_policy(backups_succeed);
    let operator = env.operator().await;
    env.apply_cluster("chat", SPEC).await.unwrap();
    env.apply_cluster("plain", "version: '1.0'").await.unwrap();
    env.wait_cluster("chat", "Running", running).await;
    let kubeconfig = env.plane().kubeconfig.clone();
    let ns = env.ns.clone();
    let run = move |cluster: &str| {
        let (kubeconfig, ns, cluster) = (kubeconfig.clone(), ns.clone(), cluster.to_string());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_dchat-operator"))
                .args(["backup", &cluster, "-n", &ns, "--wait", "--timeout", "2m"])
                .env("KUBECONFIG", kubeconfig)
                .output()
                .expect("running dchat-operator backup")
        })
    };
    let out = run("chat").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("completed: 4096 bytes at s3://dchat-backups/"),
        "{stdout}"
    );

    let out = run("plain").await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no spec.backup"), "{stderr}");
    operator.assert_no_refusals();
}

/// `beforeRollout`: a failed backup blocks the switch (the rollout fails, traffic stays);
/// a completed one lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_before_the_switch_blocks_the_rollout() {
    use dchat_operator::api::RolloutStep;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(env) = Env::shared("backup-before-rollout").await else {
        return;
    };
    let succeed = Arc::new(AtomicBool::new(false));
    let flag = succeed.clone();
    env.kubelet.set_policy(move |pod| match job_name(pod) {
        Some(job)
            if job.contains("-backup-") && !flag.load(std::sync::atomic::Ordering::Relaxed) =>
        {
            Fate::Exit(1, r#"{"error":"SlowDown: bucket throttled"}"#.into())
        }
        _ => backups_succeed(pod),
    });
    let operator = env.operator().await;
    let spec = |version: &str| {
        format!(
            "version: '{version}'\nrollout: {{postPromotionWindow: 5s, scaleDownDelay: 3s}}\nbackup: {{destination: {{s3: {{bucket: dchat-backups, region: eu-west-1}}}}, beforeRollout: true}}"
        )
    };
    env.apply_cluster("chat", &spec("1.0")).await.unwrap();
    env.wait_cluster("chat", "Running 1.0", running).await;
    env.apply_cluster("chat", &spec("1.1")).await.unwrap();
    let cluster = env
        .wait_cluster("chat", "the rollout failed on its backup", |c| {
            c.status
                .as_ref()
                .and_then(|s| s.rollout.as_ref())
                .is_some_and(|r| r.step == RolloutStep::Failed)
        })
        .await;
    let status = cluster.status.unwrap();
    let rollout = status.rollout.unwrap();
    assert_eq!(rollout.reason.as_deref(), Some("BackupFailed"));
    assert!(rollout.message.contains("SlowDown"), "{}", rollout.message);
    assert_eq!(status.active_slot.as_str(), "blue", "traffic never moved");
    assert_eq!(status.active_version.as_deref(), Some("1.0"));

    succeed.store(true, Ordering::Relaxed);
    env.apply_cluster("chat", &spec("1.2")).await.unwrap();
    let cluster = env
        .wait_cluster("chat", "Running 1.2", |c| {
            running(c) && c.status.as_ref().and_then(|s| s.active_version.as_deref()) == Some("1.2")
        })
        .await;
    assert_eq!(cluster.status.unwrap().active_slot.as_str(), "green");
    let backups: Api<DchatBackup> = env.api();
    let list = backups.list(&ListParams::default()).await.unwrap().items;
    assert!(
        list.iter()
            .any(|b| b.name_any().starts_with("chat-prerollout-")
                && b.status
                    .as_ref()
                    .is_some_and(|s| s.phase == BackupPhase::Completed)),
        "{:?}",
        list.iter()
            .map(|b| (b.name_any(), b.status.clone()))
            .collect::<Vec<_>>()
    );
    operator.assert_no_refusals();
}

/// `spec.bootstrap.recovery`: a new cluster restores a backup before clients are
/// admitted (no client Service until then); a failed restore keeps them out and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_restores_its_backup_before_it_serves() {
    use k8s_openapi::api::core::v1::Service;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    let Some(env) = Env::shared("bootstrap-recovery").await else {
        return;
    };
    // 0: restore pods wait; 1: they fail (bad checksum); 2: they succeed.
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    env.kubelet.set_policy(move |pod| match job_name(pod) {
        Some(job) if job.contains("-restore-") => match m.load(Ordering::Relaxed) {
            0 => Fate::Pending,
            1 => Fate::Exit(
                1,
                r#"{"error":"sha256 mismatch: the object is not the backup"}"#.into(),
            ),
            _ => Fate::Exit(0, r#"{"ok":true}"#.into()),
        },
        _ => default_fate(pod),
    });
    // The backup of a cluster that is gone.
    let backups: Api<DchatBackup> = env.api();
    backups
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "dchat.network/v1alpha1", "kind": "DchatBackup",
                "metadata": {"name": "lost-20261206t120000z"},
                "spec": {"cluster": {"name": "lost"}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    backups
        .patch_status(
            "lost-20261206t120000z",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"phase": "Completed", "sizeBytes": 1}})),
        )
        .await
        .unwrap();
    let operator = env.operator().await;
    let spec =
        format!("{SPEC}\nbootstrap: {{recovery: {{backup: {{name: lost-20261206t120000z}}}}}}");
    env.apply_cluster("chat", &spec).await.unwrap();
    let restoring = env
        .wait_cluster("chat", "Restoring with its Job", |c| {
            c.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Restoring
                    && s.restore
                        .as_ref()
                        .and_then(|r| r.job_name.as_ref())
                        .is_some()
            })
        })
        .await;
    let restore = restoring.status.unwrap().restore.unwrap();
    assert_eq!(
        restore.backup_path,
        format!("{}/lost/lost-20261206t120000z", env.ns)
    );
    let job_name = restore.job_name.clone().unwrap();
    // Created once the new relay is up.
    let job: Job = wait_for("the restore Job", || env.get::<Job>(&job_name)).await;
    let command = job.spec.unwrap().template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap()
        .join(" ");
    assert!(
        command.contains("backup restore --backup-path") && command.contains("--target embedded"),
        "{command}"
    );
    assert!(
        env.get::<Service>("chat").await.is_none(),
        "no clients before the data is in"
    );

    mode.store(1, Ordering::Relaxed);
    let failed = env
        .wait_cluster("chat", "the restore failed", |c| {
            c.status.as_ref().is_some_and(|s| s.phase == Phase::Failed)
        })
        .await;
    assert_eq!(
        condition(&failed, "Stalled").map(|c| c.status.as_str()),
        Some("True")
    );
    assert!(condition(&failed, "Degraded")
        .unwrap()
        .message
        .contains("sha256 mismatch"));
    assert!(env.get::<Service>("chat").await.is_none());

    // Deleting the failed Job retries; this time it succeeds.
    mode.store(2, Ordering::Relaxed);
    env.api::<Job>()
        .delete(
            restore.job_name.as_deref().unwrap(),
            &DeleteParams::background(),
        )
        .await
        .unwrap();
    let cluster = env
        .wait_cluster("chat", "Running after the restore", running)
        .await;
    let status = cluster.status.unwrap();
    assert_eq!(
        status.restore.unwrap().phase,
        dchat_operator::api::RestorePhase::Completed
    );
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    wait_for("the client Service", || async {
        env.get::<Service>("chat").await
    })
    .await;
    operator.assert_no_refusals();
}

/// `spec.backup.verify`: the drill restores the newest Completed backup into a scratch
/// store; its result lands on the cluster and on the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_drill_records_its_result() {
    let Some(env) = Env::shared("backup-verify").await else {
        return;
    };
    env.kubelet.set_policy(|pod| match job_name(pod) {
        Some(job) if job.contains("-verify-") => Fate::Exit(
            0,
            r#"{"backup":"x","ok":true,"restoreSeconds":2.5,"counts":{"messages":12,"tombstones":3,"profiles":2,"memberships":5}}"#.into(),
        ),
        _ => backups_succeed(pod),
    });
    let operator = env.operator().await;
    env.apply_cluster(
        "chat",
        &format!("{SPEC}\n").replace("retention:", "verify: {schedule: '* * * * *'}, retention:"),
    )
    .await
    .unwrap();
    env.wait_cluster("chat", "Running", running).await;
    let backups: Api<DchatBackup> = env.api();
    backups
        .create(&PostParams::default(), &on_demand("drilled"))
        .await
        .unwrap();
    wait_backup(&env, "drilled", BackupPhase::Completed).await;
    let cluster = env
        .wait_cluster("chat", "a passed drill", |c| {
            c.status
                .as_ref()
                .and_then(|s| s.backup.as_ref())
                .and_then(|b| b.last_verification.as_ref())
                .is_some_and(|v| v.passed && v.backup == "drilled")
        })
        .await;
    let drill = cluster
        .status
        .unwrap()
        .backup
        .unwrap()
        .last_verification
        .unwrap();
    assert_eq!(drill.restore_seconds, Some(2.5));
    let backup = wait_for("the drill on the backup", || async {
        let b = backups.get("drilled").await.ok()?;
        b.status.as_ref()?.verification.as_ref()?;
        Some(b)
    })
    .await;
    assert!(backup.status.unwrap().verification.unwrap().passed);
    operator.assert_no_refusals();
}
