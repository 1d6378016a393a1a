//! Running the `kubectl-dchat` binary against a test's control plane, and kubeconfigs
//! of other users, contexts and namespaces.

use std::path::PathBuf;
use std::process::Stdio;

use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::Env;

/// The plugin binary built by cargo for this test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kubectl-dchat");

/// How one run ended.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// What it printed.
    pub stdout: String,
    /// What it printed as errors and warnings.
    pub stderr: String,
}

/// Runs `kubectl dchat ARGS` as the admin user in the test's namespace.
pub async fn dchat(env: &Env, args: &[&str]) -> Run {
    let kubeconfig = env.plane().kubeconfig.display().to_string();
    let mut all = vec!["--kubeconfig", &kubeconfig, "-n", &env.ns];
    all.extend_from_slice(args);
    run_raw(&all).await
}

/// Runs `kubectl-dchat ARGS` exactly as given.
pub async fn run_raw(args: &[&str]) -> Run {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("running kubectl-dchat");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `kubectl dchat ARGS` still running, whose output is read line by line.
pub struct Running {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: Vec<String>,
}

/// Starts `kubectl dchat ARGS` as the admin user in the test's namespace.
pub fn spawn(env: &Env, args: &[&str]) -> Running {
    let mut child = tokio::process::Command::new(BIN)
        .arg("--kubeconfig")
        .arg(&env.plane().kubeconfig)
        .args(["-n", &env.ns])
        .args(args)
        .env_remove("KUBECONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting kubectl-dchat");
    let stdout = child.stdout.take().expect("its stdout");
    Running {
        child,
        lines: BufReader::new(stdout).lines(),
        seen: Vec::new(),
    }
}

impl Running {
    /// Reads its output until a line contains `text` (it is waiting for something).
    pub async fn until_line(&mut self, text: &str) {
        let found = tokio::time::timeout(crate::support::TIMEOUT, async {
            while let Some(line) = self.lines.next_line().await.expect("reading its output") {
                self.seen.push(line.clone());
                if line.contains(text) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "no line with {text:?}; it printed:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits until it exits; everything it printed.
    pub async fn finish(mut self) -> Run {
        while let Some(line) = self.lines.next_line().await.expect("reading its output") {
            self.seen.push(line);
        }
        let out = tokio::time::timeout(crate::support::TIMEOUT, self.child.wait_with_output())
            .await
            .expect("it exits in time")
            .expect("its exit status");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: self.seen.join("\n") + "\n",
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A copy of the admin kubeconfig changed by `edit`, in the plane's temporary folder.
pub fn kubeconfig_with(
    env: &Env,
    label: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let text = std::fs::read_to_string(&env.plane().kubeconfig).expect("the admin kubeconfig");
    let mut config: serde_json::Value = serde_norway::from_str(&text).expect("kubeconfig YAML");
    edit(&mut config);
    let path = std::env::temp_dir().join(format!(
        "kubectl-dchat-{}-{}-{label}.kubeconfig",
        std::process::id(),
        env.ns
    ));
    std::fs::write(&path, serde_norway::to_string(&config).expect("YAML")).expect("writing it");
    path
}

/// A kubeconfig that authenticates with a bearer token (a ServiceAccount's) instead.
pub fn kubeconfig_for_token(env: &Env, label: &str, token: &str) -> PathBuf {
    kubeconfig_with(env, label, |config| {
        for user in config["users"].as_array_mut().expect("users") {
            user["user"] = serde_json::json!({ "token": token });
        }
    })
}

/// The DchatCluster `name` as raw JSON (it may hold fields the typed API lacks).
pub async fn raw_cluster(env: &Env, name: &str) -> serde_json::Value {
    let api = dynamic_clusters(env);
    serde_json::to_value(api.get(name).await.expect("reading the DchatCluster")).expect("JSON")
}

/// Merge-patches the DchatCluster's status, as the operator would.
pub async fn patch_status(env: &Env, name: &str, status: serde_json::Value) {
    dynamic_clusters(env)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .expect("patching the DchatCluster's status");
}

fn dynamic_clusters(env: &Env) -> Api<DynamicObject> {
    Api::namespaced_with(
        env.admin.clone(),
        &env.ns,
        &ApiResource::erase::<dchat_operator::api::DchatCluster>(&()),
    )
}

/// A condition as the operator writes it.
pub fn condition(type_: &str, status: &str) -> serde_json::Value {
    serde_json::json!({
        "type": type_, "status": status, "reason": "Test", "message": "set by the test",
        "lastTransitionTime": "2026-01-01T00:00:00Z"
    })
}

/// The annotation `key` of the DchatCluster `name`.
pub async fn annotation(env: &Env, name: &str, key: &str) -> Option<String> {
    raw_cluster(env, name).await["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

/// Asserts the run succeeded, showing its output otherwise.
pub fn ok(run: &Run) {
    assert_eq!(
        run.code, 0,
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        run.code, run.stdout, run.stderr
    );
}
