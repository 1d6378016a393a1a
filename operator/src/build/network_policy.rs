//! NetworkPolicy: clients in on 7070, scrapes in on 9090, relay to relay, and egress to
//! DNS, PostgreSQL and HTTPS only.

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::configmap::{METRICS_PORT, RELAY_PORT};
use crate::api::DchatCluster;
use crate::backup::job::BACKUP_APP_NAME;
use crate::labels::{self, Component};
use crate::rollout::handover::HANDOVER_APP_NAME;

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_string()),
        ..NetworkPolicyPort::default()
    }
}

fn anywhere() -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: "0.0.0.0/0".to_string(),
            ..IPBlock::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// The network policy `<name>`, or `None` when disabled.
pub fn network_policy(cluster: &DchatCluster) -> Option<NetworkPolicy> {
    let spec = &cluster.spec.network_policy;
    if !spec.enabled {
        return None;
    }
    let relays = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(labels::cluster_selector(cluster)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let scrapers = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: (!spec.metrics_namespace_selector.is_empty())
                .then(|| spec.metrics_namespace_selector.clone()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let ingress = vec![
        // Clients arrive through Services, load balancers and ingress controllers.
        NetworkPolicyIngressRule {
            from: None,
            ports: Some(vec![tcp(RELAY_PORT)]),
        },
        NetworkPolicyIngressRule {
            from: Some(vec![scrapers]),
            ports: Some(vec![tcp(METRICS_PORT)]),
        },
        // Relays of both slots talk to each other: peer links and slot handover.
        NetworkPolicyIngressRule {
            from: Some(vec![relays.clone()]),
            ports: Some(vec![tcp(RELAY_PORT), tcp(METRICS_PORT)]),
        },
        // The rollout's handover Job and the backup Job call the relays' admin API
        // (embedded store).
        NetworkPolicyIngressRule {
            from: Some(
                [HANDOVER_APP_NAME, BACKUP_APP_NAME]
                    .into_iter()
                    .map(|app| NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([
                                ("app.kubernetes.io/name".to_string(), app.to_string()),
                                ("app.kubernetes.io/instance".to_string(), cluster.name_any()),
                            ])),
                            ..LabelSelector::default()
                        }),
                        ..NetworkPolicyPeer::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![tcp(METRICS_PORT)]),
        },
    ];
    let mut egress = vec![
        NetworkPolicyEgressRule {
            to: None,
            ports: Some(vec![
                NetworkPolicyPort {
                    port: Some(IntOrString::Int(53)),
                    protocol: Some("UDP".to_string()),
                    ..NetworkPolicyPort::default()
                },
                tcp(53),
            ]),
        },
        NetworkPolicyEgressRule {
            to: Some(vec![relays]),
            ports: Some(vec![tcp(RELAY_PORT), tcp(METRICS_PORT)]),
        },
        // Object storage and the chain RPC endpoint live outside the cluster.
        NetworkPolicyEgressRule {
            to: Some(vec![anywhere()]),
            ports: Some(vec![tcp(443)]),
        },
    ];
    if let Some(database) = &cluster.spec.database {
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![anywhere()]),
            ports: Some(vec![tcp(database.port)]),
        });
    }
    Some(NetworkPolicy {
        metadata: labels::child_meta(
            cluster,
            labels::cluster_object_name(cluster),
            labels::labels(cluster, Component::Policy),
        ),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels::cluster_selector(cluster)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_string(), "Egress".to_string()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    fn ports(rule_ports: &Option<Vec<NetworkPolicyPort>>) -> Vec<(i32, String)> {
        rule_ports
            .iter()
            .flatten()
            .map(|p| match (&p.port, &p.protocol) {
                (Some(IntOrString::Int(n)), Some(proto)) => (*n, proto.clone()),
                other => panic!("unexpected port {other:?}"),
            })
            .collect()
    }

    #[test]
    fn absent_when_disabled() {
        assert!(network_policy(&cluster_from_yaml(
            "version: '1'\nnetworkPolicy: {enabled: false}"
        ))
        .is_none());
    }

    #[test]
    fn ingress_allows_clients_scrapes_and_peers() {
        let np = network_policy(&cluster_from_yaml(
            "version: '1'\nnetworkPolicy: {metricsNamespaceSelector: {kubernetes.io/metadata.name: monitoring}}",
        ))
        .unwrap();
        let spec = np.spec.unwrap();
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_string(), "Egress".to_string()])
        );
        let ingress = spec.ingress.unwrap();
        assert_eq!(ports(&ingress[0].ports), vec![(7070, "TCP".into())]);
        assert!(ingress[0].from.is_none());
        assert_eq!(ports(&ingress[1].ports), vec![(9090, "TCP".into())]);
        let scrape_ns = ingress[1].from.as_ref().unwrap()[0]
            .namespace_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(scrape_ns["kubernetes.io/metadata.name"], "monitoring");
        let peers = ingress[2].from.as_ref().unwrap()[0]
            .pod_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(peers["app.kubernetes.io/instance"], "chat");
        // The handover Job of this cluster reaches the admin port, and only that.
        assert_eq!(ports(&ingress[3].ports), vec![(9090, "TCP".into())]);
        let handover = ingress[3].from.as_ref().unwrap()[0]
            .pod_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(handover["app.kubernetes.io/name"], "dchat-handover");
        assert_eq!(handover["app.kubernetes.io/instance"], "chat");
    }

    #[test]
    fn egress_allows_dns_https_and_database_port() {
        let np = network_policy(&cluster_from_yaml(
            "version: '1'\nreplicas: 2\ndatabase: {secretRef: {name: db}, port: 6432}",
        ))
        .unwrap();
        let egress = np.spec.unwrap().egress.unwrap();
        let all: Vec<(i32, String)> = egress.iter().flat_map(|r| ports(&r.ports)).collect();
        assert!(all.contains(&(53, "UDP".into())));
        assert!(all.contains(&(53, "TCP".into())));
        assert!(all.contains(&(443, "TCP".into())));
        assert!(all.contains(&(6432, "TCP".into())));
        assert!(!all.contains(&(5432, "TCP".into())));
    }

    #[test]
    fn no_database_egress_for_embedded_storage() {
        let np = network_policy(&cluster_from_yaml("version: '1'")).unwrap();
        let all: Vec<(i32, String)> = np
            .spec
            .unwrap()
            .egress
            .unwrap()
            .iter()
            .flat_map(|r| ports(&r.ports))
            .collect();
        assert!(!all.contains(&(5432, "TCP".into())));
    }
}
