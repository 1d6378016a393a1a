//! `dchat-operator render`: every object the operator would create for a DchatCluster
//! file, without contacting a cluster — for review and GitOps diffs.

use std::path::Path;

use kube::ResourceExt;
use serde::Deserialize;

use crate::api::{admit, AdmissionError, Slot};
use crate::build::{desired_children, BuildInputs, OptionalKinds, SerializeError};

/// Why a file could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{path}: document {index}: not valid YAML: {source}")]
    Yaml {
        /// File path.
        path: String,
        /// 1-based document number.
        index: usize,
        /// The parse error, with line and column.
        #[source]
        source: serde_norway::Error,
    },
    /// A DchatCluster in the file is invalid.
    #[error("{path}: document {index}: {source}")]
    Invalid {
        /// File path.
        path: String,
        /// 1-based document number.
        index: usize,
        /// Which fields are wrong.
        #[source]
        source: AdmissionError,
    },
    /// The file holds no DchatCluster.
    #[error("{path}: no DchatCluster (apiVersion dchat.network/v1alpha1) in the file")]
    NoCluster {
        /// File path.
        path: String,
    },
    /// An object could not be serialized (a bug).
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// Output could not be written as YAML (a bug).
    #[error("writing YAML: {0}")]
    Output(#[source] serde_norway::Error),
}

/// Options of the render command.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Namespace for clusters whose metadata has none.
    pub namespace: String,
    /// Render ServiceMonitor and PrometheusRule as if the Prometheus Operator is installed.
    pub monitoring_available: bool,
}

/// Renders every DchatCluster in `text` (multi-document YAML; other kinds are skipped)
/// into multi-document YAML of its children.
pub fn render_str(path: &str, text: &str, options: &RenderOptions) -> Result<String, RenderError> {
    let mut out = String::new();
    let mut clusters = 0;
    for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value =
            serde_json::Value::deserialize(document).map_err(|source| RenderError::Yaml {
                path: path.to_string(),
                index,
                source,
            })?;
        if value.is_null() {
            continue;
        }
        let is_cluster = value.get("kind").and_then(|k| k.as_str()) == Some("DchatCluster");
        if !is_cluster {
            continue;
        }
        let mut cluster = admit(&value).map_err(|source| RenderError::Invalid {
            path: path.to_string(),
            index,
            source,
        })?;
        if cluster.namespace().is_none() {
            cluster.metadata.namespace = Some(options.namespace.clone());
        }
        clusters += 1;
        let served = if options.monitoring_available {
            OptionalKinds::ALL
        } else {
            OptionalKinds::NONE
        };
        let mut inputs = BuildInputs::steady(&cluster, Slot::Blue, served);
        // Hibernating (admission checked the annotation): relays at zero, no autoscaler.
        let hibernating = crate::day2::hibernation_requested(&cluster)
            .ok()
            .flatten()
            .is_some();
        if hibernating {
            for slot in &mut inputs.slots {
                slot.replicas = Some(0);
            }
        }
        let children = desired_children(&cluster, &inputs).into_iter().filter(|c| {
            !(hibernating && matches!(c, crate::build::Child::HorizontalPodAutoscaler(_)))
        });
        for child in children {
            let erased = child.erase()?;
            out.push_str("---\n");
            out.push_str(&serde_norway::to_string(&erased.body).map_err(RenderError::Output)?);
        }
    }
    if clusters == 0 {
        return Err(RenderError::NoCluster {
            path: path.to_string(),
        });
    }
    Ok(out)
}

/// Reads and renders a file.
pub fn render_file(path: &Path, options: &RenderOptions) -> Result<String, RenderError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: display.clone(),
        source,
    })?;
    render_str(&display, &text, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> RenderOptions {
        RenderOptions {
            namespace: "default".into(),
            monitoring_available: true,
        }
    }

    #[test]
    fn renders_every_child_and_skips_other_kinds() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\n---\napiVersion: dchat.network/v1alpha1\nkind: DchatCluster\nmetadata: {name: chat}\nspec: {version: '1.0.0'}\n";
        let out = render_str("x.yaml", text, &options()).unwrap();
        let kinds: Vec<String> = serde_norway::Deserializer::from_str(&out)
            .map(|d| {
                let v = serde_json::Value::deserialize(d).unwrap();
                format!(
                    "{}/{}",
                    v["kind"].as_str().unwrap(),
                    v["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "ConfigMap/chat-config",
                "ServiceAccount/chat-relay",
                "Service/chat-blue-headless",
                "Service/chat-green-headless",
                "Service/chat",
                "Service/chat-preview",
                "StatefulSet/chat-blue",
                "NetworkPolicy/chat",
                "ServiceMonitor/chat",
                "PrometheusRule/chat",
            ]
        );
        assert!(out.contains("namespace: default"));
    }

    #[test]
    fn invalid_spec_names_document_and_field() {
        let text = "apiVersion: dchat.network/v1alpha1\nkind: DchatCluster\nmetadata: {name: chat}\nspec: {version: '1', replicas: -2}\n";
        let err = render_str("bad.yaml", text, &options())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.yaml: document 1"), "{err}");
        assert!(err.contains("spec.replicas"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        let err = render_str("bad.yaml", "spec: [unclosed", &options()).unwrap_err();
        assert!(matches!(err, RenderError::Yaml { index: 1, .. }), "{err}");
    }

    #[test]
    fn file_without_cluster_is_an_error() {
        let err = render_str("x.yaml", "apiVersion: v1\nkind: Secret\n", &options()).unwrap_err();
        assert!(matches!(err, RenderError::NoCluster { .. }));
    }

    #[test]
    fn a_hibernating_cluster_renders_at_zero_without_an_autoscaler() {
        let spec = |extra: &str| {
            format!(
                "apiVersion: dchat.network/v1alpha1\nkind: DchatCluster\nmetadata:\n  name: chat\n{extra}spec:\n  version: '1'\n  replicas: 2\n  database: {{secretRef: {{name: db}}}}\n  autoscaling: {{enabled: true, minReplicas: 2, maxReplicas: 4}}\n"
            )
        };
        let running = render_str("c.yaml", &spec(""), &options()).unwrap();
        assert!(running.contains("kind: HorizontalPodAutoscaler"));
        let hibernating = render_str(
            "c.yaml",
            &spec("  annotations:\n    dchat.network/hibernation: 'on'\n"),
            &options(),
        )
        .unwrap();
        assert!(!hibernating.contains("kind: HorizontalPodAutoscaler"));
        assert!(hibernating.contains("replicas: 0"), "{hibernating}");
        let bad = render_str(
            "c.yaml",
            &spec("  annotations:\n    dchat.network/hibernation: 'yes'\n"),
            &options(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("metadata.annotations[dchat.network/hibernation]")
                && bad.contains("\"on\""),
            "{bad}"
        );
    }
}
