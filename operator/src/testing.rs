//! Helpers for the crate's unit tests.

use kube::api::ObjectMeta;

use crate::api::{DchatCluster, DchatClusterSpec};

/// Parses a spec from YAML (test input, so a parse failure is a test bug).
pub fn spec_from_yaml(yaml: &str) -> DchatClusterSpec {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("bad test spec: {e}\n{yaml}"))
}

/// A DchatCluster `apps/chat` with the given spec YAML, as the API server would return it.
pub fn cluster_from_yaml(yaml: &str) -> DchatCluster {
    DchatCluster {
        metadata: ObjectMeta {
            name: Some("chat".to_string()),
            namespace: Some("apps".to_string()),
            uid: Some("0b7e5a4e-1111-4a6f-9a51-cluster000001".to_string()),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec: spec_from_yaml(yaml),
        status: None,
    }
}
