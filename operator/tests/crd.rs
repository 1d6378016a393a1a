//! The checked-in CRD must be what the code generates, so `kubectl apply -f crds/` and the
//! Helm chart install the schema the operator was built with.

use dchat_operator::api::{DchatBackup, DchatCluster};
use kube::CustomResourceExt;

fn checked_in() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/dchatclusters.dchat.network.yaml"
    );
    std::fs::read_to_string(path).expect("crds/dchatclusters.dchat.network.yaml is readable")
}

#[test]
fn crds_directory_is_current() {
    let generated = serde_norway::to_string(&DchatCluster::crd()).unwrap();
    assert!(
        checked_in() == generated,
        "crds/ is stale: run scripts/checks/sync-generated.sh"
    );
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/dchatbackups.dchat.network.yaml"
    );
    let backup = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        backup == serde_norway::to_string(&DchatBackup::crd()).unwrap(),
        "crds/dchatbackups.dchat.network.yaml is stale: run scripts/checks/sync-generated.sh"
    );
}

#[test]
fn backup_crd_has_the_promised_shape() {
    let crd = DchatBackup::crd();
    assert_eq!(crd.spec.group, "dchat.network");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, vec!["Cluster", "Phase", "Size", "Age"]);
    let spec = serde_json::to_value(&version.schema).unwrap();
    let rules = spec.pointer("/openAPIV3Schema/properties/spec/x-kubernetes-validations");
    assert!(
        rules.is_some_and(|r| r.to_string().contains("self == oldSelf")),
        "spec must be immutable: {rules:?}"
    );
}

#[test]
fn crd_has_the_promised_shape() {
    let crd = DchatCluster::crd();
    assert_eq!(crd.spec.group, "dchat.network");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["dchat".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let subresources = version.subresources.as_ref().unwrap();
    assert!(subresources.status.is_some());
    let scale = subresources.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        vec!["Ready", "Version", "Slot", "Phase", "Paused", "Age"]
    );
}

#[test]
fn every_schema_property_has_a_description() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                if prop.get("description").is_none() && !here.starts_with(".metadata") {
                    missing.push(here.clone());
                }
                // Kubernetes' own types (affinity, tolerations, conditions) document themselves.
                if !here.contains(".affinity")
                    && !here.contains(".tolerations")
                    && !here.contains(".conditions")
                {
                    walk(&here, prop, missing);
                }
            }
        }
        if let Some(items) = schema.get("items") {
            walk(path, items, missing);
        }
    }
    let crd = serde_json::to_value(DchatCluster::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk("", schema, &mut missing);
    missing.retain(|p| p != ".apiVersion" && p != ".kind" && p != ".metadata");
    assert!(
        missing.is_empty(),
        "fields without description: {missing:?}"
    );
}

/// kubectl expands a category before it looks for a short name, so a category that is
/// also a resource name of either CRD would turn `kubectl get dchat NAME` into a request
/// for several kinds ("you must specify only one resource").
#[test]
fn no_category_is_also_a_resource_name() {
    let crds = [DchatCluster::crd(), DchatBackup::crd()];
    let mut resource_names = Vec::new();
    for crd in &crds {
        let names = &crd.spec.names;
        resource_names.push(names.plural.clone());
        resource_names.extend(names.singular.clone());
        resource_names.extend(names.short_names.clone().unwrap_or_default());
        resource_names.push(names.kind.to_lowercase());
    }
    for crd in &crds {
        for category in crd.spec.names.categories.clone().unwrap_or_default() {
            assert!(
                !resource_names.contains(&category),
                "{}: category {category:?} is also a resource name",
                crd.spec.names.kind
            );
        }
    }
    assert_eq!(
        DchatCluster::crd().spec.names.short_names,
        Some(vec!["dchat".to_string()]),
        "the docs use `kubectl get dchat NAME`"
    );
}
