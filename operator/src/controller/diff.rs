//! Does a live object already hold everything the operator wants? Deciding that without a
//! write is what keeps a reconcile of an unchanged cluster free of write requests.

use serde_json::Value;

use crate::quantity::parse_quantity;

/// True when every field of `desired` is present in `live` with an equal value.
///
/// Fields the API server or other controllers add (defaults, status, annotations of
/// other tools) are ignored, because they are not in `desired`. Quantities compare by
/// value ("1000m" equals "1", "1Gi" equals "1024Mi"), because the API server rewrites
/// them into canonical form. An empty desired map or list matches an absent live field,
/// because the API server drops empty collections.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => {
            want.iter().all(|(key, value)| match have.get(key) {
                Some(live_value) => is_subset(value, live_value),
                None => is_empty(value),
            })
        }
        (Value::Object(want), Value::Null) => want.is_empty(),
        (Value::Array(want), Value::Array(have)) => {
            want.len() == have.len() && want.iter().zip(have).all(|(w, h)| is_subset(w, h))
        }
        (Value::Array(want), Value::Null) => want.is_empty(),
        (Value::String(want), Value::String(have)) => {
            want == have
                || matches!(
                    (parse_quantity(want), parse_quantity(have)),
                    (Ok(a), Ok(b)) if a == b
                )
        }
        (Value::Number(want), Value::Number(have)) => {
            want == have || want.as_f64() == have.as_f64()
        }
        (want, have) => want == have,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(list) => list.is_empty(),
        _ => false,
    }
}

/// True when `manager` owns `spec.replicas` of the live object, judged from its
/// `metadata.managedFields`.
pub fn manager_owns_replicas(live: &Value, manager: &str) -> bool {
    live.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|entry| entry.get("manager").and_then(Value::as_str) == Some(manager))
        .filter(|entry| entry.get("operation").and_then(Value::as_str) == Some("Apply"))
        .any(|entry| entry.pointer("/fieldsV1/f:spec/f:replicas").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_live_fields_are_ignored() {
        let desired =
            json!({"spec": {"replicas": 3, "template": {"containers": [{"name": "relay"}]}}});
        let live = json!({
            "metadata": {"resourceVersion": "9"},
            "spec": {"replicas": 3, "revisionHistoryLimit": 10,
                     "template": {"containers": [{"name": "relay", "terminationMessagePath": "/dev/termination-log"}]}},
            "status": {"readyReplicas": 3}
        });
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn a_changed_value_is_a_difference() {
        let desired = json!({"spec": {"replicas": 3}});
        assert!(!is_subset(&desired, &json!({"spec": {"replicas": 2}})));
        assert!(!is_subset(&desired, &json!({"spec": {}})));
    }

    #[test]
    fn list_length_and_order_matter() {
        let desired = json!({"ports": [{"port": 7070}, {"port": 9090}]});
        assert!(!is_subset(&desired, &json!({"ports": [{"port": 7070}]})));
        assert!(!is_subset(
            &desired,
            &json!({"ports": [{"port": 9090}, {"port": 7070}]})
        ));
    }

    #[test]
    fn quantities_compare_by_value() {
        assert!(is_subset(&json!({"cpu": "1000m"}), &json!({"cpu": "1"})));
        assert!(is_subset(
            &json!({"memory": "1024Mi"}),
            &json!({"memory": "1Gi"})
        ));
        assert!(!is_subset(
            &json!({"memory": "1Gi"}),
            &json!({"memory": "1G"})
        ));
    }

    #[test]
    fn empty_collections_match_absent_fields() {
        assert!(is_subset(
            &json!({"annotations": {}, "args": []}),
            &json!({})
        ));
        assert!(!is_subset(&json!({"args": ["x"]}), &json!({})));
    }

    #[test]
    fn replica_ownership_is_read_from_managed_fields() {
        let live = json!({"metadata": {"managedFields": [
            {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            {"manager": "dchat-operator", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}}
        ]}});
        assert!(manager_owns_replicas(&live, "dchat-operator"));
        assert!(!manager_owns_replicas(&live, "someone-else"));
        let without = json!({"metadata": {"managedFields": [
            {"manager": "dchat-operator", "operation": "Apply", "fieldsV1": {"f:spec": {"f:template": {}}}}
        ]}});
        assert!(!manager_owns_replicas(&without, "dchat-operator"));
    }
}
