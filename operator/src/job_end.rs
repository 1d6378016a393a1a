//! How a Job ended, read one way by everything that runs one (a rollout's smoke test and
//! handover, a backup, a restore, a drill) and by the watch that decides which Job
//! changes start a reconcile (`controller::triggers::job_change_key`).
//!
//! The Job controller marks an end twice: first `SuccessCriteriaMet` or `FailureTarget`,
//! then, once the Job's pods are gone, `Complete` or `Failed`. Either of a pair is the end.

use k8s_openapi::api::batch::v1::{Job, JobCondition};

/// The conditions of a successful end, the final one first.
pub const SUCCEEDED: [&str; 2] = ["Complete", "SuccessCriteriaMet"];

/// The conditions of a failed end, the final one first.
pub const FAILED: [&str; 2] = ["Failed", "FailureTarget"];

/// The first of `types` (in their order) that is a true condition of `job`.
pub fn true_condition<'a>(job: &'a Job, types: &[&str]) -> Option<&'a JobCondition> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    types.iter().find_map(|type_| {
        conditions
            .iter()
            .find(|c| c.type_ == *type_ && c.status == "True")
    })
}

/// Whether a pod of `job` succeeded (the rollout takes that as success before any
/// condition says so).
pub fn pod_succeeded(job: &Job) -> bool {
    job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0
}

/// Whether `job` has an outcome anything acts on: a condition of either end, or a pod
/// that succeeded.
pub fn ended(job: &Job) -> bool {
    true_condition(job, &SUCCEEDED).is_some()
        || true_condition(job, &FAILED).is_some()
        || pod_succeeded(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::JobStatus;

    fn job(conditions: &[(&str, &str)], succeeded: Option<i32>) -> Job {
        Job {
            status: Some(JobStatus {
                succeeded,
                conditions: Some(
                    conditions
                        .iter()
                        .map(|(type_, status)| JobCondition {
                            type_: type_.to_string(),
                            status: status.to_string(),
                            ..JobCondition::default()
                        })
                        .collect(),
                ),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn either_condition_of_a_pair_is_the_end_and_the_final_one_is_preferred() {
        let early = job(&[("SuccessCriteriaMet", "True")], Some(1));
        assert_eq!(
            true_condition(&early, &SUCCEEDED).map(|c| c.type_.as_str()),
            Some("SuccessCriteriaMet")
        );
        let both = job(&[("FailureTarget", "True"), ("Failed", "True")], None);
        assert_eq!(
            true_condition(&both, &FAILED).map(|c| c.type_.as_str()),
            Some("Failed")
        );
        assert!(ended(&early) && ended(&both));
        assert!(ended(&job(&[], Some(1))), "a pod succeeded");
        assert!(!ended(&job(&[("Complete", "False")], None)));
        assert!(!ended(&Job::default()));
    }
}
