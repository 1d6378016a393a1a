//! `kubectl dchat version`: the plugin's version and the operator's, read from the
//! operator's Deployment (found by the Helm chart's labels).

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use crate::status::image_tag;

/// Labels of the chart's operator Deployment (`charts/dchat-operator`, helper
/// `dchat-operator.labels`).
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=dchat-operator,app.kubernetes.io/component=operator";
/// The chart's default release namespace, looked in when listing every namespace is
/// not allowed.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "dchat-system";
/// The operator's container in the chart's Deployment.
const OPERATOR_CONTAINER: &str = "operator";

/// This plugin's version.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One operator install found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorInstall {
    /// Version: the image tag, else the `app.kubernetes.io/version` label.
    pub version: String,
    /// `namespace/name` of the Deployment.
    pub deployment: String,
    /// The operator container's image.
    pub image: Option<String>,
    /// Ready replicas / desired replicas.
    pub ready: String,
}

/// What is known of the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorVersion {
    /// Installs found (usually one).
    Found(Vec<OperatorInstall>),
    /// None found; why.
    Unknown(String),
}

/// The operator installs among `deployments` (already selected by label).
pub fn installs(deployments: &[Deployment]) -> Vec<OperatorInstall> {
    deployments
        .iter()
        .map(|d| {
            let container = d.spec.as_ref().and_then(|s| {
                let containers = &s.template.spec.as_ref()?.containers;
                containers
                    .iter()
                    .find(|c| c.name == OPERATOR_CONTAINER)
                    .or(containers.first())
            });
            let image = container.and_then(|c| c.image.clone());
            let label = d
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/version"))
                .cloned();
            let version = image
                .as_deref()
                .and_then(image_tag)
                .or(label)
                .unwrap_or_else(|| "unknown".into());
            let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            OperatorInstall {
                version,
                deployment: format!(
                    "{}/{}",
                    d.metadata.namespace.as_deref().unwrap_or_default(),
                    d.metadata.name.as_deref().unwrap_or_default()
                ),
                image,
                ready: format!("{ready}/{desired}"),
            }
        })
        .collect()
}

/// Finds the operator: in `namespace` if given, else in every namespace, else (when
/// that is forbidden) in the chart's default namespace.
pub async fn operator(client: &Client, namespace: Option<&str>) -> OperatorVersion {
    let params = ListParams::default().labels(OPERATOR_SELECTOR);
    let scoped = |ns: &str| -> Api<Deployment> { Api::namespaced(client.clone(), ns) };
    let (listed, place) = match namespace {
        Some(ns) => (scoped(ns).list(&params).await, format!("namespace {ns}")),
        None => match Api::<Deployment>::all(client.clone()).list(&params).await {
            Err(kube::Error::Api(s)) if s.is_forbidden() => (
                scoped(DEFAULT_OPERATOR_NAMESPACE).list(&params).await,
                format!(
                    "namespace {DEFAULT_OPERATOR_NAMESPACE} (listing every namespace is forbidden; \
                     name it with --operator-namespace)"
                ),
            ),
            other => (other, "any namespace".to_string()),
        },
    };
    match listed {
        Ok(list) if list.items.is_empty() => OperatorVersion::Unknown(format!(
            "no Deployment labelled {OPERATOR_SELECTOR} in {place}"
        )),
        Ok(list) => OperatorVersion::Found(installs(&list.items)),
        Err(kube::Error::Api(s)) if s.is_forbidden() => {
            OperatorVersion::Unknown(format!("listing Deployments in {place} is forbidden"))
        }
        Err(e) => OperatorVersion::Unknown(format!("listing Deployments in {place}: {e}")),
    }
}

/// The `version` output.
pub fn render(operator: Option<&OperatorVersion>) -> String {
    let mut out = format!("kubectl-dchat {PLUGIN_VERSION}\n");
    match operator {
        None => {}
        Some(OperatorVersion::Unknown(why)) => {
            out.push_str(&format!("dchat-operator unknown ({why})\n"));
        }
        Some(OperatorVersion::Found(installs)) => {
            for i in installs {
                out.push_str(&format!(
                    "dchat-operator {} (Deployment {}, image {}, {} ready)\n",
                    i.version,
                    i.deployment,
                    i.image.as_deref().unwrap_or("-"),
                    i.ready
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(image: &str, label: Option<&str>) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "dchat-dchat-operator", "namespace": "dchat-system",
                          "labels": label.map(|v| serde_json::json!({"app.kubernetes.io/version": v}))},
            "spec": {"replicas": 2, "selector": {},
                     "template": {"spec": {"containers": [
                         {"name": "sidecar", "image": "busybox:1"},
                         {"name": "operator", "image": image}]}}},
            "status": {"readyReplicas": 1}
        }))
        .unwrap()
    }

    #[test]
    fn the_image_tag_of_the_operator_container_is_the_version() {
        let found = installs(&[deployment(
            "ghcr.io/dchat/dchat-operator:1.4.2",
            Some("1.4.0"),
        )]);
        assert_eq!(
            found,
            vec![OperatorInstall {
                version: "1.4.2".into(),
                deployment: "dchat-system/dchat-dchat-operator".into(),
                image: Some("ghcr.io/dchat/dchat-operator:1.4.2".into()),
                ready: "1/2".into(),
            }]
        );
    }

    #[test]
    fn a_digest_pinned_image_falls_back_to_the_version_label() {
        let found = installs(&[deployment(
            "registry:5000/dchat-operator@sha256:abc",
            Some("1.4.2"),
        )]);
        assert_eq!(found[0].version, "1.4.2");
        let found = installs(&[deployment("registry:5000/dchat-operator", None)]);
        assert_eq!(found[0].version, "unknown");
    }

    #[test]
    fn output_says_unknown_with_the_reason() {
        let text = render(Some(&OperatorVersion::Unknown("no Deployment".into())));
        assert_eq!(
            text,
            format!("kubectl-dchat {PLUGIN_VERSION}\ndchat-operator unknown (no Deployment)\n")
        );
        assert_eq!(render(None), format!("kubectl-dchat {PLUGIN_VERSION}\n"));
    }
}
