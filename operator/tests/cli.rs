//! The `dchat-operator` binary's offline commands: output, and exit code 2 with the field
//! path on bad input.

use std::process::Command;

fn operator(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dchat-operator"))
        .args(args)
        .output()
        .expect("run dchat-operator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn temp_file(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("dchat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn render_prints_multi_document_yaml() {
    let (code, stdout, stderr) = operator(&["render", "-f", &example("dev.yaml")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("---\n"));
    assert!(stdout.contains("kind: StatefulSet"));
    assert!(stdout.contains("name: dchat-dev-blue"));
}

#[test]
fn render_without_monitoring_leaves_out_prometheus_objects() {
    let (code, stdout, _) = operator(&[
        "render",
        "-f",
        &example("production.yaml"),
        "--no-monitoring",
    ]);
    assert_eq!(code, 0);
    assert!(!stdout.contains("kind: ServiceMonitor"));
    assert!(stdout.contains("kind: HorizontalPodAutoscaler"));
}

#[test]
fn invalid_spec_exits_2_naming_the_field() {
    let path = temp_file(
        "bad.yaml",
        "apiVersion: dchat.network/v1alpha1\nkind: DchatCluster\nmetadata: {name: chat}\nspec: {version: '1', autoscaling: {minReplicas: 0}}\n",
    );
    let (code, stdout, stderr) = operator(&["render", "-f", &path]);
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    assert!(stderr.contains("spec.autoscaling.minReplicas"), "{stderr}");
}

#[test]
fn unreadable_and_malformed_files_exit_2() {
    let (code, _, stderr) = operator(&["render", "-f", "/nonexistent/cluster.yaml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/cluster.yaml"), "{stderr}");
    let path = temp_file("broken.yaml", "spec: {version: [\n");
    let (code, _, stderr) = operator(&["render", "-f", &path]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not valid YAML"), "{stderr}");
}

#[test]
fn crd_and_rbac_print_yaml() {
    let (code, stdout, _) = operator(&["crd"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("name: dchatclusters.dchat.network"));
    let (code, stdout, _) = operator(&["rbac"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("dchatclusters/status"));
}

#[test]
fn unknown_command_is_a_usage_error() {
    let (code, _, stderr) = operator(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("Usage"), "{stderr}");
}

/// Text logs written to a pipe or a file carry no colour codes (only a terminal gets them).
#[test]
fn text_logs_into_a_pipe_have_no_colour_codes() {
    let out = Command::new(env!("CARGO_BIN_EXE_dchat-operator"))
        .args([
            "run",
            "--log-format",
            "text",
            "--disable-leader-election",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", "/nonexistent/dchat-test/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("NO_COLOR")
        .output()
        .expect("run dchat-operator");
    assert_eq!(out.status.code(), Some(1), "no cluster to talk to");
    let logs = [out.stdout, out.stderr].concat();
    let text = String::from_utf8_lossy(&logs);
    assert!(text.contains("ERROR"), "the failure is logged: {text}");
    assert!(
        !logs.contains(&0x1b),
        "ANSI escape codes in piped logs: {text:?}"
    );
}
