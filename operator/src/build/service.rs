//! Services: one headless Service per slot for peer DNS, the client Service on the active
//! slot and the preview Service on the idle slot.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::configmap::{METRICS_PORT, RELAY_PORT};
use crate::api::{DchatCluster, Slot};
use crate::labels::{self, Component};

fn port(name: &str, port: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(target.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// Headless Service `<name>-<slot>-headless`: stable DNS for the slot's relays, and the
/// target of the ServiceMonitor.
pub fn headless_service(cluster: &DchatCluster, slot: Slot) -> Service {
    Service {
        metadata: labels::child_meta(
            cluster,
            labels::headless_service_name(cluster, slot),
            labels::slot_labels(cluster, slot),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            // Peers must find each other while they start, before they are ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(labels::slot_selector(cluster, slot)),
            ports: Some(vec![
                port("ws", RELAY_PORT, "ws"),
                port("metrics", METRICS_PORT, "metrics"),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Client Service `<name>`: what clients connect to; selects the active slot.
pub fn client_service(cluster: &DchatCluster, active: Slot) -> Service {
    let spec = &cluster.spec.service;
    let mut metadata = labels::child_meta(
        cluster,
        labels::client_service_name(cluster),
        labels::labels(cluster, Component::Relay),
    );
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().to_string()),
            selector: Some(labels::slot_selector(cluster, active)),
            ports: Some(vec![port("ws", spec.port, "ws")]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Preview Service `<name>-preview`: selects the idle slot, where a new version is
/// validated before it gets traffic.
pub fn preview_service(cluster: &DchatCluster, idle: Slot) -> Service {
    Service {
        metadata: labels::child_meta(
            cluster,
            labels::preview_service_name(cluster),
            labels::labels(cluster, Component::Relay),
        ),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(labels::slot_selector(cluster, idle)),
            ports: Some(vec![port("ws", RELAY_PORT, "ws")]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn headless_service_is_per_slot() {
        let svc = headless_service(&cluster_from_yaml("version: '1'"), Slot::Green);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat-green-headless"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap()["dchat.network/slot"], "green");
        let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![7070, 9090]);
    }

    #[test]
    fn client_service_selects_active_slot_with_spec_settings() {
        let cluster = cluster_from_yaml(
            "version: '1'\nservice: {type: LoadBalancer, port: 443, annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}}",
        );
        let svc = client_service(&cluster, Slot::Green);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat"));
        assert_eq!(
            svc.metadata.annotations.unwrap()["service.beta.kubernetes.io/aws-load-balancer-type"],
            "nlb"
        );
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.selector.unwrap()["dchat.network/slot"], "green");
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.port, 443);
        assert_eq!(port.target_port, Some(IntOrString::String("ws".into())));
    }

    #[test]
    fn preview_service_selects_idle_slot() {
        let svc = preview_service(&cluster_from_yaml("version: '1'"), Slot::Blue);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat-preview"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector.unwrap()["dchat.network/slot"], "blue");
    }
}
