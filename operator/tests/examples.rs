//! Every example in examples/ must be a DchatCluster a real cluster accepts (schema, CEL,
//! operator rules) and must render into well-formed Kubernetes objects.

use std::path::PathBuf;

use dchat_operator::render::{render_file, RenderOptions};
use serde::Deserialize;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn render(name: &str) -> Vec<serde_json::Value> {
    let options = RenderOptions {
        namespace: "default".into(),
        monitoring_available: true,
    };
    let out = render_file(&examples_dir().join(name), &options)
        .unwrap_or_else(|e| panic!("examples/{name} does not render: {e}"));
    serde_norway::Deserializer::from_str(&out)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect()
}

/// Deserializes each object into its typed Kubernetes struct with unknown fields denied
/// by a round trip: a field the schema does not know disappears and the comparison fails.
fn assert_typed_round_trip(object: &serde_json::Value) {
    use k8s_openapi::api::{apps, autoscaling, core, networking, policy};
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(object: &serde_json::Value) {
        let typed: T = serde_json::from_value(object.clone())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", object["metadata"]["name"]));
        let back = serde_json::to_value(&typed).unwrap();
        assert_eq!(&back, object, "fields lost in round trip");
    }
    match object["kind"].as_str().unwrap() {
        "StatefulSet" => check::<apps::v1::StatefulSet>(object),
        "Service" => check::<core::v1::Service>(object),
        "ConfigMap" => check::<core::v1::ConfigMap>(object),
        "ServiceAccount" => check::<core::v1::ServiceAccount>(object),
        "HorizontalPodAutoscaler" => check::<autoscaling::v2::HorizontalPodAutoscaler>(object),
        "PodDisruptionBudget" => check::<policy::v1::PodDisruptionBudget>(object),
        "NetworkPolicy" => check::<networking::v1::NetworkPolicy>(object),
        "Ingress" => check::<networking::v1::Ingress>(object),
        "ServiceMonitor" | "PrometheusRule" => {
            assert_eq!(object["apiVersion"], "monitoring.coreos.com/v1")
        }
        other => panic!("unexpected kind {other}"),
    }
}

fn kinds(objects: &[serde_json::Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dev_example_is_one_relay_on_embedded_storage() {
    let objects = render("dev.yaml");
    objects.iter().for_each(assert_typed_round_trip);
    let kinds = kinds(&objects);
    assert_eq!(kinds.iter().filter(|k| *k == "StatefulSet").count(), 1);
    assert!(!kinds.contains(&"HorizontalPodAutoscaler".to_string()));
    assert!(!kinds.contains(&"PodDisruptionBudget".to_string()));
    assert!(!kinds.contains(&"ServiceMonitor".to_string()));
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    assert_eq!(sts["spec"]["replicas"], 1);
}

#[test]
fn production_example_has_the_full_fleet() {
    let objects = render("production.yaml");
    objects.iter().for_each(assert_typed_round_trip);
    let kinds = kinds(&objects);
    for kind in [
        "StatefulSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Ingress",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(
            kinds.contains(&kind.to_string()),
            "{kind} missing: {kinds:?}"
        );
    }
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    assert!(
        sts["spec"].get("replicas").is_none(),
        "the HPA owns replicas"
    );
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(env.iter().any(
        |e| e["name"] == "DB_PASSWORD" && e["valueFrom"]["secretKeyRef"]["name"] == "dchat-db"
    ));
    // The example names no namespace: everything lands in the one rendered into.
    assert!(objects
        .iter()
        .all(|o| o["metadata"]["namespace"] == "default"));
}

#[test]
fn the_secret_example_has_every_database_key() {
    let text = std::fs::read_to_string(examples_dir().join("database-secret.yaml")).unwrap();
    let secret: k8s_openapi::api::core::v1::Secret = serde_norway::from_str(&text).unwrap();
    let data = secret.string_data.unwrap();
    for key in ["host", "port", "name", "username", "password"] {
        assert!(data.contains_key(key), "{key}");
    }
}

/// `kubectl apply -n team-a -f examples/x.yaml` is refused when the file names another
/// namespace, so no example pins one.
#[test]
fn examples_apply_into_any_namespace() {
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (index, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value = serde_json::Value::deserialize(document).unwrap();
            assert!(
                value.pointer("/metadata/namespace").is_none(),
                "{}: document {} sets metadata.namespace; apply it with -n instead",
                path.display(),
                index + 1
            );
        }
    }
}
