//! The relay ConfigMap: the relay settings as `DCHAT_*` environment variables.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use crate::api::DchatCluster;
use crate::labels::{self, Component};

/// Port the relays serve WebSocket clients and peers on.
pub const RELAY_PORT: i32 = 7070;
/// Port the relays serve metrics and the admin API on.
pub const METRICS_PORT: i32 = 9090;
/// Mount path of the relay data volume.
pub const DATA_DIR: &str = "/data";

/// The relay ConfigMap `<name>-config`, read by the relays with `envFrom`.
pub fn configmap(cluster: &DchatCluster) -> ConfigMap {
    let spec = &cluster.spec;
    let mut data = BTreeMap::from([
        ("DCHAT_LISTEN".to_string(), format!("0.0.0.0:{RELAY_PORT}")),
        (
            "DCHAT_METRICS_LISTEN".to_string(),
            format!("0.0.0.0:{METRICS_PORT}"),
        ),
        ("DCHAT_DATA_DIR".to_string(), DATA_DIR.to_string()),
        (
            "DCHAT_MAX_MESSAGE_BYTES".to_string(),
            spec.relay.max_message_bytes.to_string(),
        ),
        (
            "DCHAT_MESSAGE_TTL".to_string(),
            spec.relay.message_ttl.clone(),
        ),
        (
            "DCHAT_DRAIN_TIMEOUT".to_string(),
            spec.relay.drain_timeout.clone(),
        ),
        (
            "RUST_LOG".to_string(),
            spec.relay.log_level.as_str().to_string(),
        ),
    ]);
    if let Some(url) = &spec.relay.chain_rpc_url {
        data.insert("DCHAT_CHAIN_RPC".to_string(), url.clone());
    }
    if spec.database.is_none() {
        if let Some(mb) = store_write_buffer_mb(cluster) {
            data.insert("DCHAT_STORE_WRITE_BUFFER_MB".to_string(), mb.to_string());
        }
    }
    ConfigMap {
        metadata: labels::child_meta(
            cluster,
            labels::configmap_name(cluster),
            labels::labels(cluster, Component::Config),
        ),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Largest embedded-store write buffer the operator sets (the relay's own default).
const MAX_WRITE_BUFFER_MB: u128 = 128;
/// Smallest write buffer the relay accepts.
const MIN_WRITE_BUFFER_MB: u128 = 8;

/// The embedded store's write buffer for a relay with this memory: a quarter of the
/// memory limit (or, without one, of the request), at most the relay's default of
/// 128 MiB. The relay's peak use is about twice the buffer, so this keeps it to half the
/// container's memory. `None` (the relay's default) when no memory is given.
fn store_write_buffer_mb(cluster: &DchatCluster) -> Option<u128> {
    let resources = &cluster.spec.resources;
    let memory = resources
        .limits
        .memory
        .as_ref()
        .or(resources.requests.memory.as_ref())?;
    // Validated at admission; an unparsable value leaves the relay's default.
    let bytes = crate::quantity::parse_quantity(memory).ok()? / 1000;
    Some(((bytes / 4) >> 20).clamp(MIN_WRITE_BUFFER_MB, MAX_WRITE_BUFFER_MB))
}

/// A stable hash of the ConfigMap's data, put on the pod template so that a settings
/// change rolls the relays (Kubernetes does not restart pods when `envFrom` changes).
pub fn config_hash(config: &ConfigMap) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in config.data.iter().flatten() {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn carries_relay_settings_as_env() {
        let cluster = cluster_from_yaml(
            "version: '1.2.3'\nrelay: {logLevel: debug, maxMessageBytes: 65536, messageTtl: 24h, chainRpcUrl: 'https://rpc.example'}",
        );
        let cm = configmap(&cluster);
        assert_eq!(cm.metadata.name.as_deref(), Some("chat-config"));
        let data = cm.data.unwrap();
        assert_eq!(data["DCHAT_LISTEN"], "0.0.0.0:7070");
        assert_eq!(data["DCHAT_METRICS_LISTEN"], "0.0.0.0:9090");
        assert_eq!(data["DCHAT_DATA_DIR"], "/data");
        assert_eq!(data["DCHAT_MAX_MESSAGE_BYTES"], "65536");
        assert_eq!(data["DCHAT_MESSAGE_TTL"], "24h");
        assert_eq!(data["DCHAT_DRAIN_TIMEOUT"], "60s");
        assert_eq!(data["RUST_LOG"], "debug");
        assert_eq!(data["DCHAT_CHAIN_RPC"], "https://rpc.example");
    }

    #[test]
    fn write_buffer_follows_the_memory_limit_for_embedded_storage() {
        let buffer = |yaml: &str| {
            configmap(&cluster_from_yaml(yaml))
                .data
                .unwrap()
                .get("DCHAT_STORE_WRITE_BUFFER_MB")
                .cloned()
        };
        // The default limit (512Mi) gives the relay's own default.
        assert_eq!(buffer("version: '1'").as_deref(), Some("128"));
        assert_eq!(
            buffer("version: '1'\nresources: {requests: {memory: 128Mi}, limits: {memory: 256Mi}}")
                .as_deref(),
            Some("64")
        );
        assert_eq!(
            buffer("version: '1'\nresources: {requests: {memory: 16Mi}, limits: {memory: 32Mi}}")
                .as_deref(),
            Some("8")
        );
        assert_eq!(
            buffer("version: '1'\nresources: {requests: {memory: 4Gi}, limits: {memory: 8Gi}}")
                .as_deref(),
            Some("128")
        );
        // PostgreSQL relays have no embedded store.
        assert_eq!(
            buffer("version: '1'\ndatabase: {secretRef: {name: db}}"),
            None
        );
    }

    #[test]
    fn chain_rpc_is_omitted_when_unset() {
        let cm = configmap(&cluster_from_yaml("version: '1'"));
        assert!(!cm.data.unwrap().contains_key("DCHAT_CHAIN_RPC"));
    }

    #[test]
    fn hash_changes_with_settings_only() {
        let a = configmap(&cluster_from_yaml("version: '1'"));
        let b = configmap(&cluster_from_yaml("version: '2'"));
        let c = configmap(&cluster_from_yaml("version: '1'\nrelay: {messageTtl: 1h}"));
        assert_eq!(config_hash(&a), config_hash(&b));
        assert_ne!(config_hash(&a), config_hash(&c));
        assert_eq!(config_hash(&a).len(), 16);
    }
}
