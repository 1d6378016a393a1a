//! HorizontalPodAutoscaler (autoscaling/v2) on the active slot's StatefulSet.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};

use crate::api::{DchatCluster, Slot};
use crate::labels::{self, Component};

/// The autoscaler `<name>`, or `None` when autoscaling is off.
pub fn horizontal_pod_autoscaler(
    cluster: &DchatCluster,
    active: Slot,
) -> Option<HorizontalPodAutoscaler> {
    let spec = &cluster.spec.autoscaling;
    if !spec.enabled {
        return None;
    }
    let resource = |name: &str, percent: i32| MetricSpec {
        type_: "Resource".to_string(),
        resource: Some(ResourceMetricSource {
            name: name.to_string(),
            target: MetricTarget {
                type_: "Utilization".to_string(),
                average_utilization: Some(percent),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    };
    let mut metrics = Vec::new();
    if let Some(cpu) = spec.target_cpu_utilization_percentage {
        metrics.push(resource("cpu", cpu));
    }
    if let Some(memory) = spec.target_memory_utilization_percentage {
        metrics.push(resource("memory", memory));
    }
    Some(HorizontalPodAutoscaler {
        metadata: labels::child_meta(
            cluster,
            labels::cluster_object_name(cluster),
            labels::labels(cluster, Component::Policy),
        ),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_string()),
                kind: "StatefulSet".to_string(),
                name: labels::statefulset_name(cluster, active),
            },
            min_replicas: Some(spec.min_replicas),
            max_replicas: spec.max_replicas,
            metrics: Some(metrics),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn absent_when_disabled() {
        assert!(
            horizontal_pod_autoscaler(&cluster_from_yaml("version: '1'"), Slot::Blue).is_none()
        );
    }

    #[test]
    fn targets_active_statefulset_with_cpu_and_memory() {
        let cluster = cluster_from_yaml(
            "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 3, maxReplicas: 12, targetCPUUtilizationPercentage: 60, targetMemoryUtilizationPercentage: 75}",
        );
        let hpa = horizontal_pod_autoscaler(&cluster, Slot::Green).unwrap();
        assert_eq!(hpa.metadata.name.as_deref(), Some("chat"));
        let spec = hpa.spec.unwrap();
        assert_eq!(spec.scale_target_ref.kind, "StatefulSet");
        assert_eq!(spec.scale_target_ref.name, "chat-green");
        assert_eq!(spec.min_replicas, Some(3));
        assert_eq!(spec.max_replicas, 12);
        let targets: Vec<(String, Option<i32>)> = spec
            .metrics
            .unwrap()
            .into_iter()
            .map(|m| {
                let r = m.resource.unwrap();
                (r.name, r.target.average_utilization)
            })
            .collect();
        assert_eq!(
            targets,
            vec![
                ("cpu".to_string(), Some(60)),
                ("memory".to_string(), Some(75))
            ]
        );
    }
}
