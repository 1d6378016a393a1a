//! The Kubernetes permissions the operator uses — exactly these, no more. The Helm chart's
//! ClusterRole is checked against `dchat-operator rbac`, which prints this table.

use k8s_openapi::api::rbac::v1::PolicyRule;

/// Read and write verbs the operator uses on the children it applies and cleans up.
const CHILD_VERBS: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];
/// Verbs for objects the operator only reads.
const READ_VERBS: &[&str] = &["get", "list", "watch"];

/// (API group, resources, verbs) of every permission the operator needs.
pub const RULES: &[(&str, &[&str], &[&str])] = &[
    (
        "dchat.network",
        &["dchatclusters"],
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "dchat.network",
        &["dchatclusters/status"],
        &["get", "patch", "update"],
    ),
    ("dchat.network", &["dchatclusters/finalizers"], &["update"]),
    // Backups: the schedule creates them, retention deletes them, the backup controller
    // patches their finalizer and status.
    (
        "dchat.network",
        &["dchatbackups"],
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "dchat.network",
        &["dchatbackups/status"],
        &["get", "patch", "update"],
    ),
    ("dchat.network", &["dchatbackups/finalizers"], &["update"]),
    ("apps", &["statefulsets"], CHILD_VERBS),
    (
        "",
        &["services", "configmaps", "serviceaccounts"],
        CHILD_VERBS,
    ),
    ("autoscaling", &["horizontalpodautoscalers"], CHILD_VERBS),
    ("policy", &["poddisruptionbudgets"], CHILD_VERBS),
    (
        "networking.k8s.io",
        &["networkpolicies", "ingresses"],
        CHILD_VERBS,
    ),
    (
        "monitoring.coreos.com",
        &["servicemonitors", "prometheusrules"],
        CHILD_VERBS,
    ),
    ("", &["pods"], READ_VERBS),
    // Rollout smoke test, handover and backup Jobs: the operator reads, watches (backup
    // Jobs) and creates Jobs; finished ones expire through ttlSecondsAfterFinished and
    // garbage collection.
    ("batch", &["jobs"], &["get", "list", "watch", "create"]),
    // The database Secret a cluster names is hashed into the relay pod template, so
    // changed credentials roll out blue-green (read, one object by name); an
    // embedded-store cluster's admin token Secret is created once, never updated.
    ("", &["secrets"], &["get", "create"]),
    ("events.k8s.io", &["events"], &["create", "patch"]),
    (
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
    ),
];

/// The rules as Kubernetes PolicyRule objects.
pub fn policy_rules() -> Vec<PolicyRule> {
    RULES
        .iter()
        .map(|(group, resources, verbs)| PolicyRule {
            api_groups: Some(vec![group.to_string()]),
            resources: Some(resources.iter().map(|r| r.to_string()).collect()),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::managed_kinds;

    #[test]
    fn every_managed_kind_has_child_verbs() {
        for kind in managed_kinds() {
            let rule = RULES
                .iter()
                .find(|(group, resources, _)| {
                    *group == kind.resource.group
                        && resources.contains(&kind.resource.plural.as_str())
                })
                .unwrap_or_else(|| panic!("no rule for {}", kind.resource.plural));
            assert_eq!(rule.2, CHILD_VERBS, "{}", kind.resource.plural);
        }
    }

    #[test]
    fn no_wildcards() {
        for rule in policy_rules() {
            assert!(!rule.verbs.iter().any(|v| v == "*"));
            assert!(!rule.resources.unwrap().iter().any(|r| r == "*"));
        }
    }
}
