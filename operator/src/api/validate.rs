//! Checks the schema cannot express: quantity ordering and duration bounds.
//!
//! The CRD schema (patterns, ranges, CEL) runs on the API server; these rules run in the
//! operator and in `dchat-operator render`, and a failure becomes a `Degraded` condition
//! naming the field.

use std::time::Duration;

use super::{DchatClusterSpec, ResourceAmounts};
use crate::quantity::{parse_duration, parse_quantity};

/// One invalid field: its path from the object root and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.resources.limits.memory`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every invalid field of a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Shortest message TTL and drain the relays accept (they refuse to start below it).
const MIN_RELAY_DURATION: Duration = Duration::from_secs(1);
/// Longest drain the operator accepts; a longer grace period stalls node drains.
const MAX_DRAIN: Duration = Duration::from_secs(3600);

/// Checks the rules of a spec that the CRD schema cannot; returns every failure.
pub fn validate(spec: &DchatClusterSpec) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let mut fail = |path: &str, message: String| {
        errors.push(FieldError {
            path: path.to_string(),
            message,
        })
    };

    check_amounts(
        "spec.resources.requests",
        &spec.resources.requests,
        &mut fail,
    );
    check_amounts("spec.resources.limits", &spec.resources.limits, &mut fail);
    for (name, request, limit) in [
        (
            "cpu",
            &spec.resources.requests.cpu,
            &spec.resources.limits.cpu,
        ),
        (
            "memory",
            &spec.resources.requests.memory,
            &spec.resources.limits.memory,
        ),
    ] {
        if let (Some(request), Some(limit)) = (request, limit) {
            if let (Ok(r), Ok(l)) = (parse_quantity(request), parse_quantity(limit)) {
                if l < r {
                    fail(
                        &format!("spec.resources.limits.{name}"),
                        format!("limit {limit} is below the request {request}"),
                    );
                }
            }
        }
    }
    match parse_quantity(&spec.storage.size) {
        Ok(0) => fail("spec.storage.size", "must be greater than zero".into()),
        Ok(_) => {}
        Err(e) => fail("spec.storage.size", e.to_string()),
    }

    match parse_duration(&spec.relay.message_ttl) {
        Ok(d) if d < MIN_RELAY_DURATION => fail(
            "spec.relay.messageTtl",
            format!("must be at least 1s, got {}", spec.relay.message_ttl),
        ),
        Ok(_) => {}
        Err(e) => fail("spec.relay.messageTtl", e.to_string()),
    }
    match parse_duration(&spec.relay.drain_timeout) {
        Ok(d) if d < MIN_RELAY_DURATION => fail(
            "spec.relay.drainTimeout",
            format!("must be at least 1s, got {}", spec.relay.drain_timeout),
        ),
        Ok(d) if d > MAX_DRAIN => fail(
            "spec.relay.drainTimeout",
            format!("must be at most 1h, got {}", spec.relay.drain_timeout),
        ),
        Ok(_) => {}
        Err(e) => fail("spec.relay.drainTimeout", e.to_string()),
    }
    match parse_duration(&spec.monitoring.interval) {
        Ok(d) if d < Duration::from_secs(1) => fail(
            "spec.monitoring.interval",
            "must be at least 1s".to_string(),
        ),
        Ok(_) => {}
        Err(e) => fail("spec.monitoring.interval", e.to_string()),
    }

    let rollout = &spec.rollout;
    for (path, value) in [
        (
            "spec.rollout.validation.readyTimeout",
            Some(&rollout.validation.ready_timeout),
        ),
        (
            "spec.rollout.postPromotionWindow",
            Some(&rollout.post_promotion_window),
        ),
        (
            "spec.rollout.scaleDownDelay",
            Some(&rollout.scale_down_delay),
        ),
        (
            "spec.rollout.progressDeadline",
            Some(&rollout.progress_deadline),
        ),
        (
            "spec.rollout.autoPromoteAfter",
            rollout.auto_promote_after.as_ref(),
        ),
    ] {
        let Some(value) = value else { continue };
        match parse_duration(value) {
            // A zero timeout or deadline would fail every rollout at once.
            Ok(d) if d.is_zero() && path != "spec.rollout.scaleDownDelay" => {
                fail(path, "must be greater than zero".into())
            }
            Ok(_) => {}
            Err(e) => fail(path, e.to_string()),
        }
    }

    if let Some(analysis) = &rollout.analysis {
        // `.nan` or `.inf` in YAML would make every comparison false: a check that can
        // never fail.
        if !analysis.fail_above.is_finite() {
            fail(
                "spec.rollout.analysis.failAbove",
                format!("must be a finite number, got {}", analysis.fail_above),
            );
        }
        for placeholder in analysis
            .query
            .match_indices("{{")
            .map(|(i, _)| &analysis.query[i..])
        {
            let known = ["{{namespace}}", "{{cluster}}", "{{slot}}", "{{version}}"]
                .iter()
                .any(|p| placeholder.starts_with(p));
            if !known {
                let shown: String = placeholder.chars().take(24).collect();
                fail(
                    "spec.rollout.analysis.query",
                    format!("unknown placeholder at {shown:?}: use {{{{namespace}}}}, {{{{cluster}}}}, {{{{slot}}}} or {{{{version}}}}"),
                );
                break;
            }
        }
    }

    if let Some(backup) = &spec.backup {
        for (path, schedule) in [
            ("spec.backup.schedule", backup.schedule.as_ref()),
            (
                "spec.backup.verify.schedule",
                backup.verify.as_ref().map(|v| &v.schedule),
            ),
        ] {
            if let Some(Err(e)) = schedule.map(|s| s.parse::<crate::backup::cron::Cron>()) {
                fail(path, e.to_string());
            }
        }
        match parse_duration(&backup.retention.max_age) {
            Ok(d) if d.is_zero() => fail(
                "spec.backup.retention.maxAge",
                "must be greater than zero".into(),
            ),
            Ok(_) => {}
            Err(e) => fail("spec.backup.retention.maxAge", e.to_string()),
        }
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

fn check_amounts(path: &str, amounts: &ResourceAmounts, fail: &mut impl FnMut(&str, String)) {
    for (name, value) in [("cpu", &amounts.cpu), ("memory", &amounts.memory)] {
        if let Some(value) = value {
            if let Err(e) = parse_quantity(value) {
                fail(&format!("{path}.{name}"), e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::spec_from_yaml;

    fn errors_of(yaml: &str) -> Vec<FieldError> {
        match validate(&spec_from_yaml(yaml)) {
            Ok(()) => Vec::new(),
            Err(e) => e.0,
        }
    }

    #[test]
    fn analysis_threshold_must_be_finite_and_placeholders_known() {
        let errors = errors_of(
            "version: '1'\nrollout: {analysis: {prometheusUrl: 'http://p:9090', query: 'x{a=\"{{slots}}\"}', failAbove: .nan}}",
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "spec.rollout.analysis.failAbove",
                "spec.rollout.analysis.query"
            ]
        );
        assert!(
            errors[1].message.contains("{{slots}}"),
            "{}",
            errors[1].message
        );
        assert_eq!(
            errors_of("version: '1'\nrollout: {analysis: {prometheusUrl: 'http://p:9090', query: 'x{s=\"{{slot}}\",n=\"{{namespace}}\"}', failAbove: 0.5}}"),
            vec![]
        );
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(errors_of("version: '1.0.0'"), vec![]);
    }

    #[test]
    fn limit_below_request_names_the_limit() {
        let errors = errors_of(
            "version: '1'\nresources: {requests: {cpu: '2', memory: 1Gi}, limits: {cpu: 1500m, memory: 512Mi}}",
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["spec.resources.limits.cpu", "spec.resources.limits.memory"]
        );
        assert!(errors[0].message.contains("1500m"), "{}", errors[0].message);
    }

    #[test]
    fn equal_limit_and_request_is_fine() {
        assert_eq!(
            errors_of(
                "version: '1'\nresources: {requests: {memory: 1Gi}, limits: {memory: 1024Mi}}"
            ),
            vec![]
        );
    }

    #[test]
    fn zero_ttl_and_long_drain_are_refused() {
        let errors = errors_of("version: '1'\nrelay: {messageTtl: 0s, drainTimeout: 2h}");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["spec.relay.messageTtl", "spec.relay.drainTimeout"]
        );
    }

    #[test]
    fn durations_below_the_relays_minimum_are_refused_and_sums_are_accepted() {
        let errors = errors_of("version: '1'\nrelay: {messageTtl: 500ms, drainTimeout: 999ms}");
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "spec.relay.messageTtl: must be at least 1s, got 500ms",
                "spec.relay.drainTimeout: must be at least 1s, got 999ms"
            ]
        );
        assert_eq!(
            errors_of("version: '1'\nrelay: {messageTtl: 1h30m, drainTimeout: 1m30s}"),
            vec![]
        );
    }

    #[test]
    fn malformed_quantity_and_duration_are_reported() {
        let errors = errors_of("version: '1'\nstorage: {size: 10Zi}\nmonitoring: {interval: soon}");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["spec.storage.size", "spec.monitoring.interval"]);
    }

    #[test]
    fn zero_storage_is_refused() {
        let errors = errors_of("version: '1'\nstorage: {size: '0'}");
        assert_eq!(errors[0].path, "spec.storage.size");
    }

    #[test]
    fn rollout_durations_are_checked() {
        let errors = errors_of(
            "version: '1'\nrollout: {validation: {readyTimeout: 0s}, progressDeadline: soon, scaleDownDelay: 0s}",
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "spec.rollout.validation.readyTimeout",
                "spec.rollout.progressDeadline"
            ]
        );
    }

    #[test]
    fn sub_second_scrape_interval_is_refused() {
        let errors = errors_of("version: '1'\nmonitoring: {interval: 500ms}");
        assert_eq!(errors[0].path, "spec.monitoring.interval");
    }

    #[test]
    fn backup_schedules_and_retention_are_checked() {
        let errors = errors_of(
            "version: '1'\nbackup: {destination: {s3: {bucket: b, region: eu-west-1}}, schedule: '61 * * * *', retention: {maxAge: 0d}}",
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.backup.schedule", "spec.backup.retention.maxAge"],
            "{errors:?}"
        );
        assert!(errors[0].message.contains("minute field"));
    }
}
