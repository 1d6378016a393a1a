//! The relay StatefulSet of one deployment slot.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::configmap::{DATA_DIR, METRICS_PORT, RELAY_PORT};
use super::SlotDeployment;
use crate::api::{DchatCluster, ResourceAmounts, Slot};
use crate::labels;
use crate::quantity::parse_duration;

/// UID and GID the relay runs as (the relay image's non-root user).
pub const RELAY_UID: i64 = 1000;
/// Seconds added to the relay's drain timeout for the pod's termination grace period,
/// so the kubelet never kills a relay that is still flushing.
const GRACE_MARGIN_SECONDS: i64 = 15;
/// Name of the relay container.
pub const CONTAINER_NAME: &str = "relay";
/// Name of the data volume claim template.
const DATA_VOLUME: &str = "data";

/// The StatefulSet `<name>-<slot>` running the relays of one slot.
pub fn statefulset(
    cluster: &DchatCluster,
    deployment: &SlotDeployment,
    config_hash: &str,
) -> StatefulSet {
    let slot = deployment.slot;
    let selector = labels::slot_selector(cluster, slot);
    let mut pod_annotations = cluster.spec.pod.annotations.clone();
    pod_annotations.insert(
        labels::CONFIG_HASH_ANNOTATION.to_string(),
        config_hash.to_string(),
    );
    // A declarative restart is a new pod template: it rolls out blue-green like any
    // other template change (see `day2::restart_marker`).
    if let Some(at) = crate::day2::restart_marker(cluster) {
        pod_annotations.insert(
            labels::RESTARTED_AT_ANNOTATION.to_string(),
            crate::day2::marker_value(at),
        );
    }
    let claims = deployment
        .existing_claims
        .clone()
        .unwrap_or_else(|| vec![data_claim(cluster)]);

    StatefulSet {
        metadata: labels::child_meta(
            cluster,
            labels::statefulset_name(cluster, slot),
            labels::slot_labels(cluster, slot),
        ),
        spec: Some(StatefulSetSpec {
            replicas: deployment.replicas,
            service_name: Some(labels::headless_service_name(cluster, slot)),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            // Relays do not depend on each other to start; start and stop them together.
            pod_management_policy: Some("Parallel".to_string()),
            // Volumes outlive a scale-down so that no stored message is lost; they are
            // removed with the StatefulSet when the cluster is deleted.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".to_string()),
                    when_scaled: Some("Retain".to_string()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels::slot_labels(cluster, slot)),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(cluster, slot)),
            },
            volume_claim_templates: Some(claims),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

fn pod_spec(cluster: &DchatCluster, slot: Slot) -> PodSpec {
    let spec = &cluster.spec;
    let pod = &spec.pod;
    PodSpec {
        service_account_name: Some(labels::service_account_name(cluster)),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(grace_period_seconds(cluster)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            fs_group: Some(RELAY_UID),
            fs_group_change_policy: Some("OnRootMismatch".to_string()),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![relay_container(cluster, slot)],
        volumes: Some(vec![Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("64Mi".to_string())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        affinity: Some(
            pod.affinity
                .clone()
                .unwrap_or_else(|| default_affinity(cluster)),
        ),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "topology.kubernetes.io/zone".to_string(),
            when_unsatisfiable: "ScheduleAnyway".to_string(),
            label_selector: Some(LabelSelector {
                match_labels: Some(labels::slot_selector(cluster, slot)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]),
        node_selector: non_empty(pod.node_selector.clone()),
        tolerations: (!pod.tolerations.is_empty()).then(|| pod.tolerations.clone()),
        priority_class_name: pod.priority_class_name.clone(),
        image_pull_secrets: (!pod.image_pull_secrets.is_empty()).then(|| {
            pod.image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        ..PodSpec::default()
    }
}

/// Startup probe failures allowed (every 2 s): 15 minutes for the relay to open its
/// storage.
const STARTUP_PROBE_FAILURES: i32 = 450;

fn relay_container(cluster: &DchatCluster, slot: Slot) -> Container {
    let spec = &cluster.spec;
    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("ws".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    Container {
        name: CONTAINER_NAME.to_string(),
        image: Some(format!("{}:{}", spec.image, spec.version)),
        image_pull_policy: Some(spec.image_pull_policy.as_str().to_string()),
        ports: Some(vec![
            ContainerPort {
                name: Some("ws".to_string()),
                container_port: RELAY_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".to_string()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: labels::configmap_name(cluster),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: Some(env(cluster, slot)),
        // The relay restarts when it stops answering; it is ready when its storage is
        // reachable and it is not draining.
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        // The relay answers only once its storage is open, which for the embedded store
        // means replaying its journal first (docs/storage.md): allow 15 minutes, still
        // checked every 2 s so that a normal start is seen at once.
        startup_probe: Some(http_probe("/health", 2, STARTUP_PROBE_FAILURES)),
        resources: Some(resources(&spec.resources.requests, &spec.resources.limits)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: DATA_VOLUME.to_string(),
                mount_path: DATA_DIR.to_string(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_string(),
                mount_path: "/tmp".to_string(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

/// Key of the admin token in the Secret named by [`labels::admin_token_secret_name`].
pub const ADMIN_TOKEN_KEY: &str = "token";

/// `DCHAT_ADMIN_TOKEN` from the cluster's admin token Secret: the relays' admin API
/// (snapshot, import, quiesce) and the handover Job that calls it.
pub fn admin_token_env(cluster: &DchatCluster) -> EnvVar {
    EnvVar {
        name: "DCHAT_ADMIN_TOKEN".to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: labels::admin_token_secret_name(cluster),
                key: ADMIN_TOKEN_KEY.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`, `DB_PASSWORD` from the database Secret
/// (none without `spec.database`): what the relays and the backup Jobs connect with.
pub fn database_env(cluster: &DchatCluster) -> Vec<EnvVar> {
    let Some(database) = &cluster.spec.database else {
        return Vec::new();
    };
    [
        ("DB_HOST", "host"),
        ("DB_PORT", "port"),
        ("DB_NAME", "name"),
        ("DB_USER", "username"),
        ("DB_PASSWORD", "password"),
    ]
    .into_iter()
    .map(|(var, key)| EnvVar {
        name: var.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: database.secret_ref.name.clone(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    })
    .collect()
}

fn env(cluster: &DchatCluster, slot: Slot) -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
    ];
    if cluster.spec.database.is_some() {
        env.extend(database_env(cluster));
        // Relays sharing a database find each other through the slot's headless Service.
        env.push(EnvVar {
            name: "DCHAT_PEER_DNS".to_string(),
            value: Some(peer_dns(cluster, slot)),
            ..EnvVar::default()
        });
    } else {
        // Each relay keeps its own messages: a rollout hands them from the old slot to
        // the new one through the admin API.
        env.push(admin_token_env(cluster));
    }
    env
}

/// DNS name resolving to every relay pod of a slot: its headless Service.
fn peer_dns(cluster: &DchatCluster, slot: Slot) -> String {
    format!(
        "{}.{}.svc",
        labels::headless_service_name(cluster, slot),
        cluster.metadata.namespace.as_deref().unwrap_or("default")
    )
}

fn resources(requests: &ResourceAmounts, limits: &ResourceAmounts) -> ResourceRequirements {
    fn list(amounts: &ResourceAmounts) -> Option<BTreeMap<String, Quantity>> {
        let mut map = BTreeMap::new();
        if let Some(cpu) = &amounts.cpu {
            map.insert("cpu".to_string(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &amounts.memory {
            map.insert("memory".to_string(), Quantity(memory.clone()));
        }
        non_empty(map)
    }
    ResourceRequirements {
        requests: list(requests),
        limits: list(limits),
        ..ResourceRequirements::default()
    }
}

/// Spread relays of the cluster over nodes when the scheduler can.
fn default_affinity(cluster: &DchatCluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".to_string(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(labels::cluster_selector(cluster)),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn data_claim(cluster: &DchatCluster) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            labels: Some(labels::cluster_selector(cluster)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: cluster.spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(cluster.spec.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The pod's termination grace period: the relay's drain timeout plus a margin.
pub fn grace_period_seconds(cluster: &DchatCluster) -> i64 {
    let drain = parse_duration(&cluster.spec.relay.drain_timeout)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(60);
    drain + GRACE_MARGIN_SECONDS
}

fn non_empty<V>(map: BTreeMap<String, V>) -> Option<BTreeMap<String, V>> {
    (!map.is_empty()).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{fixed_replicas, SlotDeployment};
    use crate::testing::cluster_from_yaml;

    fn build(yaml: &str, slot: Slot) -> StatefulSet {
        let cluster = cluster_from_yaml(yaml);
        let deployment = SlotDeployment {
            slot,
            replicas: fixed_replicas(&cluster),
            existing_claims: None,
        };
        statefulset(&cluster, &deployment, "abc123")
    }

    fn pod(sts: &StatefulSet) -> PodSpec {
        sts.spec.clone().unwrap().template.spec.unwrap()
    }

    #[test]
    fn names_image_ports_and_selector_follow_the_slot() {
        let sts = build(
            "version: '1.4.2'\nimage: registry.example/relay",
            Slot::Green,
        );
        assert_eq!(sts.metadata.name.as_deref(), Some("chat-green"));
        assert_eq!(sts.metadata.namespace.as_deref(), Some("apps"));
        let spec = sts.spec.clone().unwrap();
        assert_eq!(spec.service_name.as_deref(), Some("chat-green-headless"));
        assert_eq!(spec.replicas, Some(1));
        let selector = spec.selector.match_labels.unwrap();
        assert_eq!(selector["dchat.network/slot"], "green");
        assert_eq!(selector["app.kubernetes.io/instance"], "chat");
        assert!(!selector.contains_key("app.kubernetes.io/version"));
        let template_labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in &selector {
            assert_eq!(
                template_labels.get(k),
                Some(v),
                "template must match selector"
            );
        }
        assert_eq!(template_labels["app.kubernetes.io/version"], "1.4.2");
        let container = &pod(&sts).containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example/relay:1.4.2")
        );
        let ports: Vec<i32> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, vec![7070, 9090]);
        let owner = &sts.metadata.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "DchatCluster");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn probes_hit_health_and_ready() {
        let sts = build("version: '1'", Slot::Blue);
        let c = &pod(&sts).containers[0];
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/health"));
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/ready"));
        assert_eq!(path(&c.startup_probe).as_deref(), Some("/health"));
        // Long enough for a journal replay before liveness applies.
        let startup = c.startup_probe.as_ref().unwrap();
        let allowed = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
        assert!(allowed >= 600, "startup probe allows only {allowed} s");
    }

    #[test]
    fn security_context_is_restricted() {
        let sts = build("version: '1'", Slot::Blue);
        let pod = pod(&sts);
        let psc = pod.security_context.clone().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(1000));
        assert_eq!(psc.run_as_group, Some(1000));
        assert_eq!(psc.fs_group, Some(1000));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let csc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(
            csc.capabilities.unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let mounts: Vec<(String, String)> = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect();
        assert_eq!(
            mounts,
            vec![
                ("data".to_string(), "/data".to_string()),
                ("tmp".to_string(), "/tmp".to_string())
            ]
        );
        assert!(pod.volumes.unwrap()[0].empty_dir.is_some());
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.service_account_name.as_deref(), Some("chat-relay"));
    }

    #[test]
    fn env_comes_from_configmap_and_database_secret() {
        let sts = build(
            "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: dchat-db}}",
            Slot::Blue,
        );
        let c = &pod(&sts).containers[0];
        assert_eq!(
            c.env_from.as_ref().unwrap()[0]
                .config_map_ref
                .as_ref()
                .unwrap()
                .name,
            "chat-config"
        );
        let env = c.env.clone().unwrap();
        let secret_key = |var: &str| {
            env.iter()
                .find(|e| e.name == var)
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|s| (s.name.clone(), s.key.clone()))
        };
        assert_eq!(
            secret_key("DB_PASSWORD"),
            Some(("dchat-db".to_string(), "password".to_string()))
        );
        assert_eq!(
            secret_key("DB_USER"),
            Some(("dchat-db".to_string(), "username".to_string()))
        );
        let peer = env.iter().find(|e| e.name == "DCHAT_PEER_DNS").unwrap();
        assert_eq!(peer.value.as_deref(), Some("chat-blue-headless.apps.svc"));
    }

    #[test]
    fn embedded_storage_has_no_database_env() {
        let sts = build("version: '1'", Slot::Blue);
        let env = pod(&sts).containers[0].env.clone().unwrap();
        assert!(env.iter().all(|e| !e.name.starts_with("DB_")));
        assert!(env.iter().any(|e| e.name == "POD_NAME"));
    }

    #[test]
    fn resources_and_volume_claim_follow_spec() {
        let sts = build(
            "version: '1'\nresources: {requests: {cpu: '1', memory: 2Gi}, limits: {cpu: '2', memory: 4Gi}}\nstorage: {size: 50Gi, storageClassName: gp3}",
            Slot::Blue,
        );
        let r = pod(&sts).containers[0].resources.clone().unwrap();
        assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "1");
        assert_eq!(r.requests.as_ref().unwrap()["memory"].0, "2Gi");
        assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "2");
        assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "4Gi");
        let claim = &sts.spec.unwrap().volume_claim_templates.unwrap()[0];
        let claim_spec = claim.spec.clone().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("gp3"));
        assert_eq!(
            claim_spec.resources.unwrap().requests.unwrap()["storage"].0,
            "50Gi"
        );
    }

    #[test]
    fn existing_claims_are_kept_because_they_are_immutable() {
        let cluster = cluster_from_yaml("version: '1'\nstorage: {size: 99Gi}");
        let old = statefulset(
            &cluster_from_yaml("version: '1'\nstorage: {size: 10Gi}"),
            &SlotDeployment {
                slot: Slot::Blue,
                replicas: Some(1),
                existing_claims: None,
            },
            "h",
        );
        let sts = statefulset(
            &cluster,
            &SlotDeployment {
                slot: Slot::Blue,
                replicas: Some(1),
                existing_claims: old.spec.unwrap().volume_claim_templates,
            },
            "h",
        );
        let claim = &sts.spec.unwrap().volume_claim_templates.unwrap()[0];
        assert_eq!(
            claim
                .spec
                .clone()
                .unwrap()
                .resources
                .unwrap()
                .requests
                .unwrap()["storage"]
                .0,
            "10Gi"
        );
    }

    #[test]
    fn replicas_are_left_to_the_hpa_when_autoscaling() {
        let sts = build(
            "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 3, maxReplicas: 9}",
            Slot::Blue,
        );
        assert_eq!(sts.spec.unwrap().replicas, None);
    }

    #[test]
    fn grace_period_covers_the_drain() {
        let sts = build("version: '1'\nrelay: {drainTimeout: 2m}", Slot::Blue);
        assert_eq!(pod(&sts).termination_grace_period_seconds, Some(135));
    }

    #[test]
    fn default_spreading_by_host_and_zone() {
        let sts = build("version: '1'", Slot::Blue);
        let pod = pod(&sts);
        let anti = pod
            .affinity
            .unwrap()
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(
            anti[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        let spread = &pod.topology_spread_constraints.unwrap()[0];
        assert_eq!(spread.topology_key, "topology.kubernetes.io/zone");
        assert_eq!(spread.when_unsatisfiable, "ScheduleAnyway");
    }

    #[test]
    fn scheduling_settings_pass_through() {
        let sts = build(
            r#"version: '1'
pod:
  nodeSelector: {pool: relay}
  tolerations: [{key: dedicated, operator: Equal, value: relay, effect: NoSchedule}]
  priorityClassName: high
  imagePullSecrets: [regcred]
  annotations: {team: chat}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms: [{matchExpressions: [{key: arch, operator: In, values: [arm64]}]}]
"#,
            Slot::Blue,
        );
        let spec = sts.spec.unwrap();
        let annotations = spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["team"], "chat");
        assert_eq!(annotations["dchat.network/config-hash"], "abc123");
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["pool"], "relay");
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
        let affinity = pod.affinity.unwrap();
        assert!(affinity.node_affinity.is_some());
        assert!(
            affinity.pod_anti_affinity.is_none(),
            "user affinity replaces the default"
        );
    }

    #[test]
    fn a_restart_request_is_a_pod_template_annotation() {
        let annotations = |sts: StatefulSet| {
            sts.spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()
        };
        let plain = annotations(build("version: '1'", Slot::Blue));
        assert!(
            !plain.contains_key(labels::RESTARTED_AT_ANNOTATION),
            "never restarted: no annotation, so the template hash is what it always was"
        );
        let restarted = annotations(build(
            "version: '1'\nrestartedAt: '2026-12-06T11:00:00+01:00'",
            Slot::Blue,
        ));
        assert_eq!(
            restarted[labels::RESTARTED_AT_ANNOTATION],
            "2026-12-06T10:00:00Z"
        );
    }
}
