//! promote, abort and status with the real operator driving blue-green rollouts.

use dchat_operator::api::{DchatCluster, Phase, RolloutStep};

use crate::plugin::{annotation, dchat, ok};
use crate::support::{observed, Env};

/// A manual gate and short windows, so a rollout takes seconds.
const GATE: &str =
    "rollout: {autoPromote: false, postPromotionWindow: 5s, scaleDownDelay: 3s, validation: {readyTimeout: 90s}}";

fn spec(version: &str) -> String {
    format!("version: '{version}'\n{GATE}")
}

fn running_on(version: &'static str) -> impl Fn(&DchatCluster) -> bool {
    move |c| {
        observed(c)
            && c.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Running && s.active_version.as_deref() == Some(version)
            })
    }
}

fn awaiting(c: &DchatCluster) -> bool {
    c.status
        .as_ref()
        .and_then(|s| s.rollout.as_ref())
        .is_some_and(|r| r.step == RolloutStep::AwaitingPromotion)
}

/// A cluster serving 1.0 whose rollout of 1.1 awaits promotion.
async fn awaiting_promotion(env: &Env) {
    env.apply_cluster("chat", &spec("1.0")).await.unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    env.apply_cluster("chat", &spec("1.1")).await.unwrap();
    env.wait_cluster("chat", "AwaitingPromotion", awaiting)
        .await;
}

/// status shows what the rollout waits for; promote --wait ends when it is Complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_waits_until_the_rollout_is_complete() {
    let Some(env) = Env::shared("plugin-promote").await else {
        return;
    };
    let operator = env.operator().await;
    let run = dchat(&env, &["promote", "chat"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "error: DchatCluster \"chat\" not found in namespace \"{}\"\n",
            env.ns
        )
    );
    env.apply_cluster("chat", &spec("1.0")).await.unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    let run = dchat(&env, &["promote", "chat"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.starts_with(&format!(
            "error: DchatCluster \"chat\" in namespace \"{}\" has no rollout in flight: nothing to promote",
            env.ns
        )),
        "{}",
        run.stderr
    );

    env.apply_cluster("chat", &spec("1.1")).await.unwrap();
    env.wait_cluster("chat", "AwaitingPromotion", awaiting)
        .await;
    let status = dchat(&env, &["status", "chat"]).await;
    ok(&status);
    let screen = &status.stdout;
    assert!(
        screen.starts_with(&format!(
            "DchatCluster {}/chat  AwaitingPromotion\n",
            env.ns
        )),
        "{screen}"
    );
    assert!(
        screen.contains("  version      1.0 serving on slot blue (spec.version 1.1)\n"),
        "{screen}"
    );
    assert!(
        screen.contains("  1.0 -> 1.1 in slot green: AwaitingPromotion for "),
        "{screen}"
    );
    assert!(
        screen.contains(&format!(
            "  waiting for  promotion: kubectl dchat promote chat -n {}\n",
            env.ns
        )),
        "{screen}"
    );
    assert!(
        screen.contains("  blue   serving  1.0      1/1"),
        "{screen}"
    );
    assert!(
        screen.contains("  green  rollout  1.1      1/1"),
        "{screen}"
    );
    assert!(
        screen.contains("RolloutStarted"),
        "the operator's Events: {screen}"
    );
    assert!(
        screen.contains("  autoscaler   none (spec.autoscaling off)\n"),
        "{screen}"
    );

    let run = dchat(&env, &["promote", "chat", "--wait", "--timeout", "2m"]).await;
    ok(&run);
    assert!(run.stdout.starts_with(&format!(
        "dchatcluster {}/chat: promote requested for the rollout 1.0 -> 1.1 (slot green, step AwaitingPromotion)",
        env.ns
    )), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("waiting for the rollout to be Complete (at most 2m)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .ends_with("done: version 1.1 serves; rollout Complete\n"),
        "{}",
        run.stdout
    );
    let cluster = env.cluster("chat").await;
    let status = cluster.status.unwrap();
    assert_eq!(status.active_version.as_deref(), Some("1.1"));
    assert_eq!(status.rollout.unwrap().step, RolloutStep::Complete);
    assert_eq!(
        annotation(&env, "chat", "dchat.network/promote").await,
        None,
        "consumed by the operator"
    );

    let json = dchat(&env, &["status", "chat", "-o", "json"]).await;
    ok(&json);
    let summary: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(summary["phase"], "Running");
    assert_eq!(summary["servingVersion"], "1.1");
    assert_eq!(summary["rollout"]["step"], "Complete");
    let yaml = dchat(&env, &["status", "chat", "-o", "yaml"]).await;
    ok(&yaml);
    let from_yaml: serde_json::Value = serde_norway::from_str(&yaml.stdout).unwrap();
    assert_eq!(from_yaml["servingVersion"], "1.1");
    operator.assert_no_refusals();
}

/// abort --wait ends when the rollout is Aborted, traffic still on the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_waits_until_the_rollout_is_aborted() {
    let Some(env) = Env::shared("plugin-abort").await else {
        return;
    };
    let operator = env.operator().await;
    awaiting_promotion(&env).await;
    let run = dchat(&env, &["abort", "chat", "--wait", "--timeout", "2m"]).await;
    ok(&run);
    assert!(run.stdout.starts_with(&format!(
        "dchatcluster {}/chat: abort requested for the rollout 1.0 -> 1.1 (slot green, step AwaitingPromotion)",
        env.ns
    )), "{}", run.stdout);
    assert!(
        run.stdout
            .ends_with("done: rollout of 1.1 Aborted; 1.0 serves\n"),
        "{}",
        run.stdout
    );
    let status = env.cluster("chat").await.status.unwrap();
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    assert_eq!(status.active_slot.as_str(), "blue");
    let again = dchat(&env, &["abort", "chat"]).await;
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains(
            "has no rollout in flight: nothing to abort; the last one, of 1.1, ended Aborted"
        ),
        "{}",
        again.stderr
    );
    operator.assert_no_refusals();
}
