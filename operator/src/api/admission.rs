//! Offline admission: checks a DchatCluster document the way the API server and the
//! operator together would — schema (types, ranges, patterns, enums), CEL rules, then
//! the operator's own rules — and reports every failure with its field path.
//!
//! `dchat-operator render` and the example tests use it, so a spec that renders here
//! is one a real cluster accepts.

use std::sync::OnceLock;

use kube::CustomResourceExt;

use super::{validate, DchatCluster, FieldError};

/// Why a document is not an acceptable DchatCluster.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The document is another kind of object.
    #[error("not a DchatCluster: apiVersion {api_version:?}, kind {kind:?} (expected dchat.network/v1alpha1 DchatCluster)")]
    WrongKind {
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
    /// One or more fields are invalid.
    #[error("invalid DchatCluster {name}: {}", join(.errors))]
    Invalid {
        /// Object name, or "<unnamed>".
        name: String,
        /// Every invalid field.
        errors: Vec<FieldError>,
    },
    /// The generated schema could not be compiled (a bug in the operator).
    #[error("internal error compiling the DchatCluster schema: {0}")]
    Schema(String),
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn open_api_schema() -> Result<&'static serde_json::Value, AdmissionError> {
    static SCHEMA: OnceLock<Result<serde_json::Value, String>> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let crd = DchatCluster::crd();
            let schema = crd
                .spec
                .versions
                .first()
                .and_then(|v| v.schema.as_ref())
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .ok_or_else(|| "generated CRD has no openAPIV3Schema".to_string())?;
            serde_json::to_value(schema).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| AdmissionError::Schema(e.clone()))
}

/// Converts a JSON pointer ("/spec/replicas") into a field path ("spec.replicas").
fn pointer_to_path(pointer: &str) -> String {
    let path = pointer.trim_start_matches('/').replace('/', ".");
    if path.is_empty() {
        "<root>".to_string()
    } else {
        path
    }
}

/// Checks one document; returns the typed cluster with defaults applied.
pub fn admit(document: &serde_json::Value) -> Result<DchatCluster, AdmissionError> {
    let api_version = document
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let kind = document
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if api_version != "dchat.network/v1alpha1" || kind != "DchatCluster" {
        return Err(AdmissionError::WrongKind {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
        });
    }
    let name = document
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let invalid = |errors: Vec<FieldError>| AdmissionError::Invalid {
        name: name.clone(),
        errors,
    };

    let schema = open_api_schema()?;
    let validator =
        jsonschema::validator_for(schema).map_err(|e| AdmissionError::Schema(e.to_string()))?;
    let mut errors: Vec<FieldError> = validator
        .iter_errors(document)
        .map(|e| FieldError {
            path: pointer_to_path(&e.instance_path().to_string()),
            message: e.to_string(),
        })
        .collect();
    if document.pointer("/metadata/name").is_none() {
        errors.push(FieldError {
            path: "metadata.name".into(),
            message: "is required".into(),
        });
    }
    if !errors.is_empty() {
        return Err(invalid(errors));
    }

    let cluster: DchatCluster = serde_path_to_error::deserialize(document).map_err(|e| {
        invalid(vec![FieldError {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }])
    })?;

    // CEL runs on the object with defaults applied, as the API server does.
    let defaulted =
        serde_json::to_value(&cluster).map_err(|e| AdmissionError::Schema(e.to_string()))?;
    if let Err(cel_errors) = kube::core::cel::Validator::new().validate(schema, &defaulted, None) {
        return Err(invalid(
            cel_errors
                .iter()
                .map(|e| FieldError {
                    path: if e.field_path.is_empty() {
                        "spec".to_string()
                    } else {
                        e.field_path.clone()
                    },
                    message: e.message.clone(),
                })
                .collect(),
        ));
    }

    validate(&cluster.spec).map_err(|e| invalid(e.0))?;
    // The operator refuses a day-2 annotation value it does not understand.
    crate::day2::check(&cluster).map_err(|e| {
        invalid(vec![FieldError {
            path: format!("metadata.annotations[{}]", e.annotation()),
            message: e.to_string(),
        }])
    })?;
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "dchat.network/v1alpha1",
            "kind": "DchatCluster",
            "metadata": {"name": "chat", "namespace": "apps"},
            "spec": spec,
        })
    }

    fn paths(result: Result<DchatCluster, AdmissionError>) -> Vec<String> {
        match result {
            Err(AdmissionError::Invalid { errors, .. }) => {
                errors.into_iter().map(|e| e.path).collect()
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_spec_is_admitted_with_defaults() {
        let cluster = admit(&doc(json!({"version": "1.4.2"}))).unwrap();
        assert_eq!(cluster.spec.replicas, 1);
        assert_eq!(cluster.spec.image, "ghcr.io/dchat/relay");
        assert_eq!(cluster.spec.service.port, 7070);
        assert!(cluster.spec.network_policy.enabled);
    }

    #[test]
    fn other_kinds_are_refused() {
        let err = admit(&json!({"apiVersion": "v1", "kind": "Secret"})).unwrap_err();
        assert!(matches!(err, AdmissionError::WrongKind { .. }), "{err}");
    }

    #[test]
    fn missing_version_is_reported_at_spec() {
        let p = paths(admit(&doc(json!({"replicas": 1}))));
        assert_eq!(p, vec!["spec"]);
    }

    #[test]
    fn range_and_enum_violations_name_the_field() {
        let p = paths(admit(&doc(json!({
            "version": "1",
            "replicas": 0,
            "service": {"type": "Magic"},
        }))));
        assert!(p.contains(&"spec.replicas".to_string()), "{p:?}");
        assert!(p.contains(&"spec.service.type".to_string()), "{p:?}");
    }

    #[test]
    fn percentages_are_bounded() {
        let p = paths(admit(&doc(json!({
            "version": "1",
            "database": {"secretRef": {"name": "db"}},
            "autoscaling": {"enabled": true, "targetCPUUtilizationPercentage": 101},
        }))));
        assert_eq!(p, vec!["spec.autoscaling.targetCPUUtilizationPercentage"]);
    }

    #[test]
    fn quantity_and_duration_formats_are_checked_by_the_schema() {
        let p = paths(admit(&doc(json!({
            "version": "1",
            "storage": {"size": "lots"},
            "relay": {"messageTtl": "forever"},
        }))));
        assert!(p.contains(&"spec.storage.size".to_string()), "{p:?}");
        assert!(p.contains(&"spec.relay.messageTtl".to_string()), "{p:?}");
    }

    #[test]
    fn analysis_needs_a_plain_http_prometheus_url_a_query_and_a_threshold() {
        let p = paths(admit(&doc(json!({
            "version": "1",
            "rollout": {"analysis": {"prometheusUrl": "https://prometheus:9090", "query": ""}},
        }))));
        assert!(
            p.contains(&"spec.rollout.analysis.prometheusUrl".to_string()),
            "{p:?}"
        );
        assert!(
            p.contains(&"spec.rollout.analysis.query".to_string()),
            "{p:?}"
        );
        let missing = admit(&doc(json!({
            "version": "1",
            "rollout": {"analysis": {"prometheusUrl": "http://p:9090", "query": "up"}},
        })))
        .unwrap_err()
        .to_string();
        assert!(missing.contains("failAbove"), "{missing}");
        let ok = admit(&doc(json!({
            "version": "1",
            "rollout": {"analysis": {"prometheusUrl": "http://prometheus-operated.monitoring.svc:9090",
                                     "query": "up", "failAbove": 0.5}},
        })))
        .unwrap();
        assert_eq!(ok.spec.rollout.analysis.unwrap().fail_above, 0.5);
    }

    #[test]
    fn embedded_storage_allows_one_relay_only() {
        let err = admit(&doc(json!({"version": "1", "replicas": 3}))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("spec.replicas"), "{text}");
        assert!(text.contains("embedded storage"), "{text}");
    }

    #[test]
    fn embedded_storage_cannot_autoscale() {
        let err = admit(&doc(
            json!({"version": "1", "autoscaling": {"enabled": true}}),
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("spec.autoscaling.enabled"),
            "{err}"
        );
    }

    #[test]
    fn min_replicas_above_max_is_refused() {
        let err = admit(&doc(json!({
            "version": "1",
            "database": {"secretRef": {"name": "db"}},
            "autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 3},
        })))
        .unwrap_err();
        assert!(
            err.to_string().contains("minReplicas must not exceed"),
            "{err}"
        );
    }

    #[test]
    fn min_available_must_leave_room_to_evict() {
        let err = admit(&doc(json!({
            "version": "1",
            "replicas": 3,
            "database": {"secretRef": {"name": "db"}},
            "disruptionBudget": {"minAvailable": 3},
        })))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.disruptionBudget.minAvailable"),
            "{err}"
        );
        admit(&doc(json!({
            "version": "1",
            "replicas": 3,
            "database": {"secretRef": {"name": "db"}},
            "disruptionBudget": {"minAvailable": 2},
        })))
        .unwrap();
    }

    #[test]
    fn both_budget_fields_are_refused() {
        let err = admit(&doc(json!({
            "version": "1",
            "replicas": 3,
            "database": {"secretRef": {"name": "db"}},
            "disruptionBudget": {"minAvailable": 1, "maxUnavailable": 1},
        })))
        .unwrap_err();
        assert!(err.to_string().contains("at most one"), "{err}");
    }

    #[test]
    fn ingress_needs_a_host() {
        let err = admit(&doc(json!({"version": "1", "ingress": {"enabled": true}}))).unwrap_err();
        assert!(
            err.to_string().contains("ingress.host is required"),
            "{err}"
        );
    }

    #[test]
    fn operator_rules_run_last() {
        let p = paths(admit(&doc(json!({
            "version": "1",
            "resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
        }))));
        assert_eq!(p, vec!["spec.resources.limits.memory"]);
    }

    #[test]
    fn unknown_version_characters_are_refused() {
        let p = paths(admit(&doc(json!({"version": "1.0 beta"}))));
        assert_eq!(p, vec!["spec.version"]);
    }
}
