//! PodDisruptionBudget (policy/v1) for the relays.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::DchatCluster;
use crate::labels::{self, Component};

/// The disruption budget `<name>`, or `None` when only one relay can run (a budget would
/// then either block node drains or protect nothing).
pub fn pod_disruption_budget(cluster: &DchatCluster) -> Option<PodDisruptionBudget> {
    let spec = &cluster.spec;
    let most_relays = if spec.autoscaling.enabled {
        spec.autoscaling.max_replicas
    } else {
        spec.replicas
    };
    if most_relays <= 1 {
        return None;
    }
    let budget = &spec.disruption_budget;
    let (min_available, max_unavailable) = match (budget.min_available, budget.max_unavailable) {
        (Some(min), _) => (Some(IntOrString::Int(min)), None),
        (None, Some(max)) => (None, Some(IntOrString::Int(max))),
        (None, None) => (None, Some(IntOrString::Int(1))),
    };
    Some(PodDisruptionBudget {
        metadata: labels::child_meta(
            cluster,
            labels::cluster_object_name(cluster),
            labels::labels(cluster, Component::Policy),
        ),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(labels::cluster_selector(cluster)),
                ..LabelSelector::default()
            }),
            min_available,
            max_unavailable,
            // A crash-looping relay must not block node drains.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_string()),
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn absent_for_a_single_relay() {
        assert!(pod_disruption_budget(&cluster_from_yaml("version: '1'")).is_none());
    }

    #[test]
    fn defaults_to_one_unavailable() {
        let pdb = pod_disruption_budget(&cluster_from_yaml(
            "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}",
        ))
        .unwrap();
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.unhealthy_pod_eviction_policy.as_deref(),
            Some("AlwaysAllow")
        );
        let selector = spec.selector.unwrap().match_labels.unwrap();
        assert_eq!(selector["app.kubernetes.io/instance"], "chat");
        assert!(!selector.contains_key("dchat.network/slot"));
    }

    #[test]
    fn min_available_is_used_when_set() {
        let pdb = pod_disruption_budget(&cluster_from_yaml(
            "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\ndisruptionBudget: {minAvailable: 2}",
        ))
        .unwrap();
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.min_available, Some(IntOrString::Int(2)));
        assert_eq!(spec.max_unavailable, None);
    }

    #[test]
    fn autoscaled_cluster_gets_a_budget() {
        let pdb = pod_disruption_budget(&cluster_from_yaml(
            "version: '1'\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 1, maxReplicas: 4}",
        ));
        assert!(pdb.is_some());
    }
}
