//! The relays' ServiceAccount, carrying e.g. the IRSA role annotation.

use k8s_openapi::api::core::v1::ServiceAccount;

use crate::api::DchatCluster;
use crate::labels::{self, Component};

/// The ServiceAccount `<name>-relay` with `spec.pod.serviceAccountAnnotations`.
pub fn service_account(cluster: &DchatCluster) -> ServiceAccount {
    let mut metadata = labels::child_meta(
        cluster,
        labels::service_account_name(cluster),
        labels::labels(cluster, Component::Config),
    );
    let annotations = &cluster.spec.pod.service_account_annotations;
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations.clone());
    }
    ServiceAccount {
        metadata,
        // Relays never call the Kubernetes API; IRSA injects its own projected token.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn carries_irsa_annotation_and_no_token() {
        let sa = service_account(&cluster_from_yaml(
            "version: '1'\npod: {serviceAccountAnnotations: {eks.amazonaws.com/role-arn: 'arn:aws:iam::1:role/r'}}",
        ));
        assert_eq!(sa.metadata.name.as_deref(), Some("chat-relay"));
        assert_eq!(
            sa.metadata.annotations.unwrap()["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::1:role/r"
        );
        assert_eq!(sa.automount_service_account_token, Some(false));
    }

    #[test]
    fn no_annotations_when_none_given() {
        let sa = service_account(&cluster_from_yaml("version: '1'"));
        assert!(sa.metadata.annotations.is_none());
    }
}
