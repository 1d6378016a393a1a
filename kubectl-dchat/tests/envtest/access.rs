//! Which cluster, namespace and user: kubeconfig flags and defaults, not found, RBAC
//! refusals, the operator version, completion.

use serde_json::json;

use crate::plugin::{dchat, kubeconfig_for_token, kubeconfig_with, ok, run_raw};
use crate::support::{rbac, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespace_comes_from_the_context_and_errors_are_clear() {
    let Some(env) = Env::shared("plugin-kubeconfig").await else {
        return;
    };
    env.apply_cluster("chat", "version: '1.0'").await.unwrap();
    let ns = env.ns.clone();
    let config = kubeconfig_with(&env, "ns", |c| {
        for context in c["contexts"].as_array_mut().unwrap() {
            context["context"]["namespace"] = json!(ns);
        }
    });
    let path = config.display().to_string();
    let run = run_raw(&["--kubeconfig", &path, "status", "chat"]).await;
    ok(&run);
    assert!(
        run.stdout
            .starts_with(&format!("DchatCluster {ns}/chat  (no status yet)\n")),
        "{}",
        run.stdout
    );

    let run = run_raw(&["--kubeconfig", &path, "status", "nosuch"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stderr,
        format!("error: DchatCluster \"nosuch\" not found in namespace \"{ns}\"\n")
    );
    let run = run_raw(&["--kubeconfig", &path, "-n", "elsewhere", "status", "chat"]).await;
    assert_eq!(
        run.stderr,
        "error: DchatCluster \"chat\" not found in namespace \"elsewhere\"\n"
    );

    let run = run_raw(&[
        "--kubeconfig",
        &path,
        "--context",
        "nosuch",
        "status",
        "chat",
    ])
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.starts_with("error: kubeconfig: "),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("nosuch"), "{}", run.stderr);
    let run = run_raw(&["--kubeconfig", "/nonexistent/kubeconfig", "status", "chat"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = run_raw(&["wake"]).await;
    assert_eq!(run.code, 2, "a usage error: {run:?}");
}

/// A user who may read DchatClusters but nothing else: the screen says which parts it
/// may not see; a change is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_refusals_are_named() {
    let Some(env) = Env::shared("plugin-rbac").await else {
        return;
    };
    env.apply_cluster("chat", "version: '1.0'").await.unwrap();
    let rules = vec![json!({
        "apiGroups": ["dchat.network"], "resources": ["dchatclusters"], "verbs": ["get", "list"]
    })];
    let token = rbac::install_account(&env.admin, &env.ns, "reader", rules).await;
    let config = kubeconfig_for_token(&env, "reader", &token);
    let path = config.display().to_string();

    let run = run_raw(&["--kubeconfig", &path, "-n", &env.ns, "status", "chat"]).await;
    ok(&run);
    assert!(
        run.stdout.contains("Events\n  unavailable: forbidden: "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("cannot list resource \"events\""),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("  autoscaler   unavailable: forbidden: "),
        "{}",
        run.stdout
    );

    let run = run_raw(&["--kubeconfig", &path, "-n", &env.ns, "pause", "chat"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.starts_with(&format!(
            "error: forbidden: annotating DchatCluster \"chat\" in namespace \"{}\" is not allowed for this user",
            env.ns
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("cannot patch resource \"dchatclusters\""),
        "{}",
        run.stderr
    );

    let nobody = rbac::install_account(&env.admin, &env.ns, "nobody", vec![]).await;
    let config = kubeconfig_for_token(&env, "nobody", &nobody);
    let path = config.display().to_string();
    let run = run_raw(&["--kubeconfig", &path, "-n", &env.ns, "status", "chat"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with("error: forbidden: reading DchatCluster \"chat\""),
        "{}",
        run.stderr
    );
}

/// version finds the chart's operator Deployment by its labels, and says unknown first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_reads_the_operator_deployment() {
    let Some(env) = Env::shared("plugin-version").await else {
        return;
    };
    let plugin = format!("kubectl-dchat {}\n", env!("CARGO_PKG_VERSION"));
    let run = dchat(&env, &["version", "--client"]).await;
    ok(&run);
    assert_eq!(run.stdout, plugin);
    let run = dchat(&env, &["version"]).await;
    ok(&run);
    assert_eq!(
        run.stdout,
        format!("{plugin}dchat-operator unknown (no Deployment labelled app.kubernetes.io/name=dchat-operator,app.kubernetes.io/component=operator in any namespace)\n")
    );
    let deployment = rbac::rendered_chart()
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the chart renders the operator Deployment");
    let image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    let name = deployment["metadata"]["name"].as_str().unwrap().to_string();
    let mut object = deployment.clone();
    object.as_object_mut().unwrap().remove("__template__");
    let resource = kube::core::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&());
    let api: kube::Api<kube::core::DynamicObject> =
        kube::Api::namespaced_with(env.admin.clone(), rbac::RELEASE_NAMESPACE, &resource);
    api.patch(
        &name,
        &kube::api::PatchParams::apply("envtest").force(),
        &kube::api::Patch::Apply(&object),
    )
    .await
    .expect("the chart's Deployment");
    let tag = image.rsplit_once(':').unwrap().1;
    let run = dchat(&env, &["version"]).await;
    ok(&run);
    assert!(
        run.stdout.starts_with(&format!(
            "{plugin}dchat-operator {tag} (Deployment {}/{name}, image {image}, 0/",
            rbac::RELEASE_NAMESPACE
        )),
        "{}",
        run.stdout
    );
}

/// Completion scripts, and kubectl's plugin completion listing DchatClusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion() {
    let Some(env) = Env::shared("plugin-completion").await else {
        return;
    };
    for shell in ["bash", "zsh", "fish"] {
        let run = run_raw(&["completion", shell]).await;
        ok(&run);
        assert!(
            run.stdout.contains("kubectl-dchat") && run.stdout.contains("hibernate"),
            "{shell}"
        );
    }
    let run = run_raw(&["completion", "kubectl"]).await;
    ok(&run);
    assert!(
        run.stdout.starts_with("#!/bin/sh\n")
            && run.stdout.contains("exec kubectl-dchat __complete \"$@\"")
    );

    env.apply_cluster("chat", "version: '1.0'").await.unwrap();
    env.apply_cluster("chess", "version: '1.0'").await.unwrap();
    let kubeconfig = env.plane().kubeconfig.display().to_string();
    let words = |last: &'static str| {
        vec![
            "__complete".to_string(),
            "--kubeconfig".into(),
            kubeconfig.clone(),
            "-n".into(),
            env.ns.clone(),
            "status".into(),
            last.into(),
        ]
    };
    let args = words("ch");
    let run = run_raw(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    ok(&run);
    assert_eq!(run.stdout, "chat\nchess\n:4\n");
    let args = words("cha");
    let run = run_raw(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(run.stdout, "chat\n:4\n");
}
