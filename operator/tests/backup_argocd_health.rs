//! The Argo CD health check for DchatBackup (docs/argocd-health-backup.lua), run in a
//! Lua 5.1 interpreter like Argo CD's gopher-lua, on every phase the operator writes.

use mlua::{Lua, LuaSerdeExt, SerializeOptions, Table};
use serde_json::{json, Value};

fn health(obj: &Value) -> (String, String) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/argocd-health-backup.lua"
    );
    let script = std::fs::read_to_string(path).expect("docs/argocd-health-backup.lua");
    let lua = Lua::new();
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.globals()
        .set("obj", lua.to_value_with(obj, options).unwrap())
        .unwrap();
    let result: Table = lua.load(script).eval().unwrap();
    (
        result.get("status").unwrap(),
        result.get("message").unwrap_or_default(),
    )
}

fn backup(status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "dchat.network/v1alpha1", "kind": "DchatBackup",
        "metadata": {"name": "b", "namespace": "apps"},
        "spec": {"cluster": {"name": "chat"}},
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    obj
}

#[test]
fn every_phase_maps_to_argo_health() {
    for (status, expected, phrase) in [
        (None, "Progressing", "Waiting"),
        (Some(json!({"phase": "Pending"})), "Progressing", "Waiting"),
        (
            Some(json!({"phase": "Running", "jobName": "b-backup-1"})),
            "Progressing",
            "b-backup-1",
        ),
        (
            Some(json!({"phase": "Completed", "sizeBytes": 42, "location": "s3://x/y"})),
            "Healthy",
            "42 bytes at s3://x/y",
        ),
        (
            Some(json!({"phase": "Failed", "error": "AccessDenied"})),
            "Degraded",
            "AccessDenied",
        ),
    ] {
        let (status_, message) = health(&backup(status.clone()));
        assert_eq!(status_, expected, "{status:?}");
        assert!(message.contains(phrase), "{status:?}: {message}");
    }
}

/// Every phase the CRD allows is handled (a new phase must get a mapping).
#[test]
fn the_script_knows_every_phase_of_the_crd() {
    use dchat_operator::api::BackupPhase;
    for phase in [
        BackupPhase::Pending,
        BackupPhase::Running,
        BackupPhase::Completed,
        BackupPhase::Failed,
    ] {
        let (status, _) = health(&backup(Some(json!({"phase": phase.as_str()}))));
        assert_ne!(status, "Unknown", "{phase:?}");
    }
}
