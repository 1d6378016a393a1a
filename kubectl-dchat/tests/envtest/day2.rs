//! pause, resume, hibernate, wake and restart: what the plugin does to the API (the
//! annotations, under the plugin's field manager), what it says, and how `--wait` ends —
//! on a status patched by the test as the operator will write it, and with a clear
//! timeout when nothing answers. No operator runs here: its side of these commands is
//! not in this build.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

use crate::plugin::{annotation, condition, dchat, ok, patch_status, raw_cluster, spawn};
use crate::support::{wait_for, Env};

const SPEC: &str = "version: '1.0'";

/// Pause sets the annotation; `--wait` waits for condition Paused=True, and says so
/// when it does not come; resume removes the annotation and waits for it to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume() {
    let Some(env) = Env::shared("plugin-pause").await else {
        return;
    };
    env.apply_cluster("chat", SPEC).await.unwrap();

    let run = dchat(&env, &["pause", "chat"]).await;
    ok(&run);
    assert!(
        run.stdout.starts_with(&format!(
            "dchatcluster {}/chat: paused (dchat.network/reconcile=paused); the operator changes \
             nothing for it until `kubectl dchat resume chat -n {}`\n",
            env.ns, env.ns
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("watch it: kubectl dchat status chat"));
    assert_eq!(
        annotation(&env, "chat", "dchat.network/reconcile")
            .await
            .as_deref(),
        Some("paused")
    );
    let managers: Vec<String> = raw_cluster(&env, "chat").await["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["manager"].as_str().map(str::to_string))
        .collect();
    assert!(
        managers.contains(&"kubectl-dchat".to_string()),
        "{managers:?}"
    );

    // Nothing answers: a clear timeout, exit 1.
    let run = dchat(&env, &["pause", "chat", "--wait", "--timeout", "2s"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("paused already"), "{}", run.stdout);
    assert!(
        run.stderr.starts_with(
            "error: timed out after 2s: still waiting for condition Paused=True \
             (last seen: no Paused condition yet); is the operator running?"
        ),
        "{}",
        run.stderr
    );

    // The operator's answer ends the wait.
    let mut waiting = spawn(&env, &["pause", "chat", "--wait", "--timeout", "2m"]);
    waiting.until_line("no Paused condition yet").await;
    patch_status(
        &env,
        "chat",
        serde_json::json!({"conditions": [condition("Paused", "True")]}),
    )
    .await;
    let run = waiting.finish().await;
    ok(&run);
    assert!(
        run.stdout.ends_with("done: condition Paused is True\n"),
        "{}",
        run.stdout
    );

    let mut waiting = spawn(&env, &["resume", "chat", "--wait", "--timeout", "2m"]);
    waiting.until_line("condition Paused is True").await;
    assert_eq!(
        annotation(&env, "chat", "dchat.network/reconcile").await,
        None
    );
    patch_status(
        &env,
        "chat",
        serde_json::json!({"conditions": [condition("Paused", "False")]}),
    )
    .await;
    let run = waiting.finish().await;
    ok(&run);
    assert!(
        run.stdout.starts_with(&format!(
            "dchatcluster {}/chat: resumed (dchat.network/reconcile removed)",
            env.ns
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("done: condition Paused is False\n"),
        "{}",
        run.stdout
    );

    let run = dchat(&env, &["resume", "chat"]).await;
    ok(&run);
    assert!(run
        .stdout
        .contains("no dchat.network/reconcile annotation to remove"));
}

/// The DchatCluster CRD as an operator with hibernation and restarts will install it:
/// a `Hibernating` phase and fields this build's API types do not have.
async fn install_newer_crd(env: &Env) {
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    let mut crd =
        serde_json::to_value(crds.get("dchatclusters.dchat.network").await.unwrap()).unwrap();
    let schema = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for part in ["spec", "status"] {
        schema["properties"][part]["x-kubernetes-preserve-unknown-fields"] = true.into();
    }
    schema["properties"]["status"]["properties"]["phase"]
        .as_object_mut()
        .unwrap()
        .remove("enum");
    let mut crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    crd.metadata.managed_fields = None;
    crd.metadata.resource_version = None;
    crds.patch(
        "dchatclusters.dchat.network",
        &PatchParams::apply("envtest-newer-operator").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the newer CRD");
}

/// Hibernate, wake and restart, against the status a newer operator writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernate_wake_and_restart() {
    let Some(env) = Env::private("plugin-hibernate").await else {
        return;
    };
    install_newer_crd(&env).await;
    env.apply_cluster("chat", SPEC).await.unwrap();
    // The new schema is in force once a status field it allows survives a write.
    wait_for("the newer CRD in force", || async {
        patch_status(
            &env,
            "chat",
            serde_json::json!({"phase": "Running", "restartedAt": "2026-01-01T00:00:00Z"}),
        )
        .await;
        let raw = raw_cluster(&env, "chat").await;
        (raw["status"]["restartedAt"].is_string()).then_some(())
    })
    .await;

    let run = dchat(&env, &["hibernate", "chat", "--wait", "--timeout", "2s"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("hibernation requested (dchat.network/hibernation=on)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("still waiting for condition Hibernated=True (last seen: no Hibernated condition yet; phase is Running)"),
        "{}",
        run.stderr
    );
    assert_eq!(
        annotation(&env, "chat", "dchat.network/hibernation")
            .await
            .as_deref(),
        Some("on")
    );
    patch_status(
        &env,
        "chat",
        serde_json::json!({
            "phase": "Hibernating",
            "hibernation": {"since": "2026-01-01T00:00:00Z", "replicas": 1},
            "conditions": [{"type": "Hibernated", "status": "True", "reason": "Hibernated",
                "message": "no relay runs", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }),
    )
    .await;
    let run = dchat(&env, &["hibernate", "chat", "--wait", "--timeout", "1m"]).await;
    ok(&run);
    assert!(
        run.stdout.ends_with("done: condition Hibernated is True\n"),
        "{}",
        run.stdout
    );
    let status = dchat(&env, &["status", "chat"]).await;
    ok(&status);
    assert!(
        status
            .stdout
            .starts_with(&format!("DchatCluster {}/chat  Hibernating\n", env.ns)),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stdout
            .contains("  hibernation  requested by annotation dchat.network/hibernation=on\n"),
        "{}",
        status.stdout
    );

    let mut waking = spawn(&env, &["wake", "chat", "--wait", "--timeout", "2m"]);
    waking.until_line("phase is Hibernating").await;
    assert_eq!(
        annotation(&env, "chat", "dchat.network/hibernation").await,
        None
    );
    patch_status(&env, "chat", serde_json::json!({"phase": "Provisioning"})).await;
    waking
        .until_line("status.hibernation present; phase is Provisioning")
        .await;
    patch_status(
        &env,
        "chat",
        serde_json::json!({"phase": "Running", "hibernation": null, "conditions": []}),
    )
    .await;
    let run = waking.finish().await;
    ok(&run);
    assert!(
        run.stdout
            .contains("wake requested (dchat.network/hibernation removed)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("done: awake; phase is Running\n"),
        "{}",
        run.stdout
    );

    // wake with spec.hibernate set: says the spec still hibernates, and --wait fails.
    env.apply_cluster("chat", "version: '1.0'\nhibernate: true")
        .await
        .unwrap();
    let run = dchat(&env, &["wake", "chat", "--wait", "--timeout", "1m"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("warning: spec.hibernate is true"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("error: spec.hibernate is true"),
        "{}",
        run.stderr
    );
    env.apply_cluster("chat", SPEC).await.unwrap();

    // restart: the stamp in the annotation; done when status records it.
    let mut restarting = spawn(&env, &["restart", "chat", "--wait", "--timeout", "2m"]);
    restarting
        .until_line("last restart acted on: 2026-01-01T00:00:00Z")
        .await;
    let stamp = annotation(&env, "chat", "dchat.network/restartedAt")
        .await
        .expect("the restart stamp");
    assert!(
        stamp.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
        "{stamp}"
    );
    patch_status(&env, "chat", serde_json::json!({"restartedAt": stamp})).await;
    let run = restarting.finish().await;
    ok(&run);
    assert!(
        run.stdout.starts_with(&format!(
            "dchatcluster {}/chat: restart requested (dchat.network/restartedAt={stamp})",
            env.ns
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .ends_with(&format!("done: restart of {stamp} acted on\n")),
        "{}",
        run.stdout
    );
    let status = dchat(&env, &["status", "chat"]).await;
    assert!(
        status.stdout.contains(&format!(
            "  restart      requested {stamp}; acted on {stamp}\n"
        )),
        "{}",
        status.stdout
    );
}
