//! Optional Ingress in front of the client Service.

use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};

use crate::api::DchatCluster;
use crate::labels::{self, Component};

/// The Ingress `<name>` routing the host to the client Service, or `None` when disabled.
pub fn ingress(cluster: &DchatCluster) -> Option<Ingress> {
    let spec = &cluster.spec.ingress;
    if !spec.enabled {
        return None;
    }
    let mut metadata = labels::child_meta(
        cluster,
        labels::cluster_object_name(cluster),
        labels::labels(cluster, Component::Ingress),
    );
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: labels::client_service_name(cluster),
            port: Some(ServiceBackendPort {
                number: Some(cluster.spec.service.port),
                ..ServiceBackendPort::default()
            }),
        }),
        ..IngressBackend::default()
    };
    Some(Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: spec.class_name.clone(),
            rules: Some(vec![IngressRule {
                host: spec.host.clone(),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".to_string()),
                        path_type: "Prefix".to_string(),
                        backend,
                    }],
                }),
            }]),
            tls: spec.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: spec.host.clone().map(|h| vec![h]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            ..IngressSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    #[test]
    fn absent_by_default() {
        assert!(ingress(&cluster_from_yaml("version: '1'")).is_none());
    }

    #[test]
    fn routes_host_to_client_service_with_tls() {
        let ing = ingress(&cluster_from_yaml(
            "version: '1'\nservice: {port: 8443}\ningress: {enabled: true, className: alb, host: chat.example.com, tlsSecretName: chat-tls, annotations: {alb.ingress.kubernetes.io/scheme: internet-facing}}",
        ))
        .unwrap();
        assert_eq!(
            ing.metadata.annotations.unwrap()["alb.ingress.kubernetes.io/scheme"],
            "internet-facing"
        );
        let spec = ing.spec.unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some("alb"));
        let rule = &spec.rules.unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("chat.example.com"));
        let path = &rule.http.as_ref().unwrap().paths[0];
        let service = path.backend.service.as_ref().unwrap();
        assert_eq!(service.name, "chat");
        assert_eq!(service.port.as_ref().unwrap().number, Some(8443));
        let tls = &spec.tls.unwrap()[0];
        assert_eq!(tls.secret_name.as_deref(), Some("chat-tls"));
        assert_eq!(tls.hosts, Some(vec!["chat.example.com".to_string()]));
    }

    #[test]
    fn no_tls_section_without_secret() {
        let ing = ingress(&cluster_from_yaml(
            "version: '1'\ningress: {enabled: true, host: chat.example.com}",
        ))
        .unwrap();
        assert!(ing.spec.unwrap().tls.is_none());
    }
}
