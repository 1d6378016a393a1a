//! Day-2 requests on a cluster — pause, hibernation, declarative restart — read from its
//! spec and annotations, and the pure decisions they drive.
//!
//! Each request has two equal sources: a spec field (for GitOps) and an annotation (for
//! `kubectl annotate` and the `kubectl dchat` plugin, without a spec change). A value the
//! operator does not understand is an error naming the annotation and what it accepts; the
//! controller treats it like an invalid spec and changes nothing, which is also the safe
//! reading of a mistyped pause or hibernation request. The controller acts on these in
//! `controller/sync.rs`; the rollout state machine takes hibernation as an input
//! ([`crate::rollout::Hibernation`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{DchatCluster, DchatClusterSpec, HibernationStatus};
use crate::labels::{
    HIBERNATION_ANNOTATION, RECONCILE_ANNOTATION, RECONCILE_PAUSED, RESTARTED_AT_ANNOTATION,
};
use crate::rollout::{Hibernation, HibernationPlan};

/// Value of [`HIBERNATION_ANNOTATION`] that hibernates the cluster.
pub const HIBERNATION_ON: &str = "on";
/// Value of [`HIBERNATION_ANNOTATION`] that wakes it (as does removing the annotation).
pub const HIBERNATION_OFF: &str = "off";

/// Event reasons of day-2 transitions, stable for automation.
pub mod reason {
    /// Reconciliation was paused.
    pub const PAUSED: &str = "Paused";
    /// Reconciliation resumed after a pause.
    pub const RESUMED: &str = "Resumed";
    /// A restart request newer than the last one was taken up.
    pub const RESTART_REQUESTED: &str = "RestartRequested";
    /// A restart request not newer than the last one acted on was ignored.
    pub const RESTART_IGNORED: &str = "RestartIgnored";
}

/// Who asked: the spec field, the annotation, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The spec field (`spec.paused`, `spec.hibernate`).
    Spec,
    /// The annotation.
    Annotation,
    /// Both; both must be withdrawn to undo it.
    Both,
}

impl Source {
    fn of(spec: bool, annotation: bool) -> Option<Self> {
        match (spec, annotation) {
            (true, true) => Some(Self::Both),
            (true, false) => Some(Self::Spec),
            (false, true) => Some(Self::Annotation),
            (false, false) => None,
        }
    }
}

/// An annotation value the operator does not understand.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// `dchat.network/reconcile` holds something other than `paused`.
    #[error("annotation {RECONCILE_ANNOTATION}: {value:?} is not a value the operator knows; set \"{RECONCILE_PAUSED}\" to pause reconciliation, or remove the annotation to reconcile")]
    Reconcile {
        /// The value found.
        value: String,
    },
    /// `dchat.network/hibernation` holds something other than `on` or `off`.
    #[error("annotation {HIBERNATION_ANNOTATION}: {value:?} is not a value the operator knows; set \"{HIBERNATION_ON}\" to hibernate, or \"{HIBERNATION_OFF}\" (or remove it) to wake")]
    Hibernation {
        /// The value found.
        value: String,
    },
    /// `dchat.network/restartedAt` is not an RFC 3339 time.
    #[error("annotation {RESTARTED_AT_ANNOTATION}: {value:?} is not an RFC 3339 time such as 2026-12-06T10:00:00Z: {reason}")]
    RestartedAt {
        /// The value found.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
}

impl RequestError {
    /// The annotation whose value is wrong.
    pub fn annotation(&self) -> &'static str {
        match self {
            Self::Reconcile { .. } => RECONCILE_ANNOTATION,
            Self::Hibernation { .. } => HIBERNATION_ANNOTATION,
            Self::RestartedAt { .. } => RESTARTED_AT_ANNOTATION,
        }
    }
}

/// Whether reconciliation is paused, and by what.
pub fn paused(cluster: &DchatCluster) -> Result<Option<Source>, RequestError> {
    let annotation = match cluster.annotations().get(RECONCILE_ANNOTATION) {
        None => false,
        Some(value) if value == RECONCILE_PAUSED => true,
        Some(value) => {
            return Err(RequestError::Reconcile {
                value: value.clone(),
            })
        }
    };
    Ok(Source::of(cluster.spec.paused, annotation))
}

/// Whether hibernation is asked for, and by what.
pub fn hibernation_requested(cluster: &DchatCluster) -> Result<Option<Source>, RequestError> {
    let annotation = match cluster.annotations().get(HIBERNATION_ANNOTATION) {
        None => false,
        Some(value) if value == HIBERNATION_ON => true,
        Some(value) if value == HIBERNATION_OFF => false,
        Some(value) => {
            return Err(RequestError::Hibernation {
                value: value.clone(),
            })
        }
    };
    Ok(Source::of(cluster.spec.hibernate, annotation))
}

/// The newest restart the spec and the annotation ask for, to the second.
pub fn restart_requested(cluster: &DchatCluster) -> Result<Option<Timestamp>, RequestError> {
    let annotation = match cluster.annotations().get(RESTARTED_AT_ANNOTATION) {
        None => None,
        Some(value) => {
            Some(
                value
                    .trim()
                    .parse::<Timestamp>()
                    .map_err(|e| RequestError::RestartedAt {
                        value: value.clone(),
                        reason: e.to_string(),
                    })?,
            )
        }
    };
    let spec = cluster.spec.restarted_at.as_ref().map(|t| t.0);
    Ok([spec, annotation]
        .into_iter()
        .flatten()
        .map(to_second)
        .max())
}

/// Every request checked at once, for validation: the first error.
pub fn check(cluster: &DchatCluster) -> Result<(), RequestError> {
    paused(cluster)?;
    hibernation_requested(cluster)?;
    restart_requested(cluster)?;
    Ok(())
}

fn to_second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The restart the relay pod template carries: the newest of what the spec and the
/// annotation ask for and of `status.restartedAt` (the last one acted on), so an older
/// request, or removing the annotation, changes no template. `None` when no restart was
/// ever asked for: the template then has no restart annotation at all, and clusters that
/// never restarted keep their template hash.
pub fn restart_marker(cluster: &DchatCluster) -> Option<Timestamp> {
    let requested = restart_requested(cluster).ok().flatten();
    let acted = cluster
        .status
        .as_ref()
        .and_then(|s| s.restarted_at.as_ref())
        .map(|t| to_second(t.0));
    requested.into_iter().chain(acted).max()
}

/// How the restart marker is written on the pod template (RFC 3339, seconds, UTC).
pub fn marker_value(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What this reconcile does about a restart request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartNews {
    /// Nothing new.
    None,
    /// A request newer than the last one acted on: the template changes.
    Requested(Timestamp),
    /// A request not newer than the last one acted on: ignored.
    Ignored {
        /// The request.
        requested: Timestamp,
        /// The last restart acted on.
        last: Timestamp,
    },
}

/// Compares the restart asked for with the last one acted on.
pub fn restart_news(cluster: &DchatCluster) -> RestartNews {
    let Some(requested) = restart_requested(cluster).ok().flatten() else {
        return RestartNews::None;
    };
    let last = cluster
        .status
        .as_ref()
        .and_then(|s| s.restarted_at.as_ref())
        .map(|t| to_second(t.0));
    match last {
        Some(last) if requested < last => RestartNews::Ignored { requested, last },
        Some(last) if requested == last => RestartNews::None,
        _ => RestartNews::Requested(requested),
    }
}

/// The relays a wake starts: the count recorded when hibernation began, kept within the
/// autoscaling range; `spec.replicas` without autoscaling.
pub fn wake_replicas(record: &HibernationStatus, spec: &DchatClusterSpec) -> i32 {
    let scaling = &spec.autoscaling;
    if scaling.enabled {
        record.replicas.clamp(
            scaling.min_replicas,
            scaling.max_replicas.max(scaling.min_replicas),
        )
    } else {
        spec.replicas
    }
}

/// What the rollout state machine is told about hibernation.
pub fn hibernation_input(
    requested: Option<Source>,
    record: Option<&HibernationStatus>,
    spec: &DchatClusterSpec,
    restore_running: bool,
) -> Hibernation {
    match (requested, record) {
        // A bootstrap restore needs a running relay: hibernation waits for it.
        (Some(_), _) if restore_running => Hibernation::Off,
        (Some(_), _) => Hibernation::Hibernate,
        (None, Some(record)) => Hibernation::Wake {
            replicas: wake_replicas(record, spec),
        },
        (None, None) => Hibernation::Off,
    }
}

/// Where hibernation stands after this reconcile, for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HibernationView {
    /// Not asked for and nothing to wake.
    #[default]
    Off,
    /// Asked for, but something needs running relays first.
    Waiting {
        /// Who asked.
        source: Source,
        /// What it waits for.
        why: String,
    },
    /// Acted on: the relays are stopping or stopped.
    Hibernating {
        /// Who asked.
        source: Source,
        /// `status.hibernation`.
        record: HibernationStatus,
    },
    /// No longer asked for: the serving slot starts `replicas` relays.
    Waking {
        /// `status.hibernation`, kept until the wake is done.
        record: HibernationStatus,
        /// Relays being started.
        replicas: i32,
    },
}

impl HibernationView {
    /// `status.hibernation`.
    pub fn record(&self) -> Option<HibernationStatus> {
        match self {
            Self::Hibernating { record, .. } | Self::Waking { record, .. } => Some(record.clone()),
            Self::Off | Self::Waiting { .. } => None,
        }
    }
}

/// What the serving slot looked like, as far as hibernation cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServingRelays {
    /// `spec.replicas` of its StatefulSet (0 when it does not exist).
    pub desired: i32,
    /// Ready relays.
    pub ready: i32,
    /// Every pod runs the latest revision.
    pub rolled_out: bool,
    /// Relays the previous status reported (`status.replicas`).
    pub reported: i32,
}

/// Where hibernation stands, from the request, the record in status, what the rollout
/// made of it and the serving slot as observed (before this reconcile's writes).
pub fn hibernation_view(
    requested: Option<Source>,
    record: Option<&HibernationStatus>,
    plan: &HibernationPlan,
    restore_running: bool,
    serving: ServingRelays,
    spec: &DchatClusterSpec,
    now: Timestamp,
) -> HibernationView {
    match (requested, record) {
        (Some(source), _) if restore_running => HibernationView::Waiting {
            source,
            why: "the restore of the bootstrap backup finishes first".to_string(),
        },
        (Some(source), _) => match plan {
            HibernationPlan::Waiting(why) => HibernationView::Waiting {
                source,
                why: why.clone(),
            },
            _ => HibernationView::Hibernating {
                source,
                record: record.cloned().unwrap_or(HibernationStatus {
                    since: Time(now),
                    // What serves now is what a wake brings back. A StatefulSet already
                    // at zero means this reconcile works from a status older than the
                    // one that began the hibernation (a lost write, or a cached object
                    // that predates it): the relays that status reported were running
                    // before; the spec is the last resort.
                    replicas: [serving.desired, serving.reported, spec.replicas]
                        .into_iter()
                        .find(|n| *n > 0)
                        .unwrap_or(1),
                }),
            },
        },
        (None, Some(record)) => {
            let replicas = wake_replicas(record, spec);
            let awake = serving.rolled_out
                && serving.desired == replicas
                && serving.ready >= replicas
                && replicas > 0;
            if awake {
                HibernationView::Off
            } else {
                HibernationView::Waking {
                    record: record.clone(),
                    replicas,
                }
            }
        }
        (None, None) => HibernationView::Off,
    }
}

/// Whether the wake finished in this reconcile: its plan, made from the record in status,
/// still kept the autoscaler out and the relay count fixed, but the relays are all back
/// and the status it writes forgets the record. The next reconcile, from that status,
/// brings the autoscaler back; a write of status alone starts no reconcile
/// (`controller/triggers.rs`), so this one must ask for it.
pub fn wake_finished(plan: &HibernationPlan, view: &HibernationView) -> bool {
    *plan == HibernationPlan::Waking && *view == HibernationView::Off
}

/// Describes `source` for people: which field or annotation asked for `what`.
pub fn describe(source: Source, field: &str, annotation: &str) -> String {
    match source {
        Source::Spec => format!("spec.{field}"),
        Source::Annotation => format!("the annotation {annotation}"),
        Source::Both => format!("spec.{field} and the annotation {annotation}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    fn annotated(spec: &str, annotations: &[(&str, &str)]) -> DchatCluster {
        let mut cluster = cluster_from_yaml(spec);
        cluster.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        cluster
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn pause_comes_from_the_spec_the_annotation_or_both() {
        let plain = annotated("version: '1'", &[]);
        assert_eq!(paused(&plain), Ok(None));
        let by_spec = annotated("version: '1'\npaused: true", &[]);
        assert_eq!(paused(&by_spec), Ok(Some(Source::Spec)));
        let by_annotation = annotated("version: '1'", &[(RECONCILE_ANNOTATION, "paused")]);
        assert_eq!(paused(&by_annotation), Ok(Some(Source::Annotation)));
        let both = annotated(
            "version: '1'\npaused: true",
            &[(RECONCILE_ANNOTATION, "paused")],
        );
        assert_eq!(paused(&both), Ok(Some(Source::Both)));
    }

    #[test]
    fn an_unknown_annotation_value_is_an_error_naming_it() {
        let typo = annotated("version: '1'", &[(RECONCILE_ANNOTATION, "pause")]);
        let e = paused(&typo).unwrap_err();
        assert!(e.to_string().contains("dchat.network/reconcile"), "{e}");
        assert!(e.to_string().contains("\"pause\""), "{e}");
        let typo = annotated("version: '1'", &[(HIBERNATION_ANNOTATION, "true")]);
        let e = hibernation_requested(&typo).unwrap_err();
        assert!(e.to_string().contains("\"on\""), "{e}");
        assert_eq!(check(&typo), Err(e));
        let typo = annotated("version: '1'", &[(RESTARTED_AT_ANNOTATION, "yesterday")]);
        let e = restart_requested(&typo).unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
    }

    #[test]
    fn hibernation_on_off_and_absent() {
        for (spec, annotation, expected) in [
            ("version: '1'", None, None),
            ("version: '1'", Some("on"), Some(Source::Annotation)),
            ("version: '1'", Some("off"), None),
            ("version: '1'\nhibernate: true", None, Some(Source::Spec)),
            // "off" does not override the spec: either source hibernates.
            (
                "version: '1'\nhibernate: true",
                Some("off"),
                Some(Source::Spec),
            ),
            (
                "version: '1'\nhibernate: true",
                Some("on"),
                Some(Source::Both),
            ),
        ] {
            let annotations: Vec<(&str, &str)> = annotation
                .map(|v| vec![(HIBERNATION_ANNOTATION, v)])
                .unwrap_or_default();
            let cluster = annotated(spec, &annotations);
            assert_eq!(
                hibernation_requested(&cluster),
                Ok(expected),
                "{spec} {annotation:?}"
            );
        }
    }

    #[test]
    fn the_restart_marker_is_the_newest_request_or_the_last_one_acted_on() {
        let none = annotated("version: '1'", &[]);
        assert_eq!(restart_marker(&none), None);
        assert_eq!(restart_news(&none), RestartNews::None);

        // The newer of the spec and the annotation, to the second, in UTC.
        let mut cluster = annotated(
            "version: '1'\nrestartedAt: '2026-12-06T10:00:00Z'",
            &[(RESTARTED_AT_ANNOTATION, "2026-12-06T12:30:00.750+01:00")],
        );
        let requested = ts("2026-12-06T11:30:00Z");
        assert_eq!(restart_requested(&cluster), Ok(Some(requested)));
        assert_eq!(restart_marker(&cluster), Some(requested));
        assert_eq!(marker_value(requested), "2026-12-06T11:30:00Z");
        assert_eq!(restart_news(&cluster), RestartNews::Requested(requested));

        // Acted on: the same request again is nothing new.
        cluster.status = Some(crate::api::DchatClusterStatus {
            restarted_at: Some(Time(requested)),
            ..Default::default()
        });
        assert_eq!(restart_news(&cluster), RestartNews::None);
        assert_eq!(restart_marker(&cluster), Some(requested));

        // An older request is ignored and keeps the marker.
        cluster.metadata.annotations = Some(
            [(
                RESTARTED_AT_ANNOTATION.to_string(),
                "2026-12-06T09:00:00Z".to_string(),
            )]
            .into(),
        );
        cluster.spec.restarted_at = None;
        assert_eq!(
            restart_news(&cluster),
            RestartNews::Ignored {
                requested: ts("2026-12-06T09:00:00Z"),
                last: requested
            }
        );
        assert_eq!(restart_marker(&cluster), Some(requested));

        // Removing every request keeps the marker too: no template change.
        cluster.metadata.annotations = None;
        assert_eq!(restart_marker(&cluster), Some(requested));
        assert_eq!(restart_news(&cluster), RestartNews::None);
    }

    fn record(replicas: i32) -> HibernationStatus {
        HibernationStatus {
            since: Time(ts("2026-12-06T10:00:00Z")),
            replicas,
        }
    }

    #[test]
    fn a_wake_restores_the_recorded_size_within_the_autoscaling_range() {
        let fixed =
            cluster_from_yaml("version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}");
        assert_eq!(wake_replicas(&record(7), &fixed.spec), 3);
        let scaled = cluster_from_yaml(
            "version: '1'\nreplicas: 2\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 2, maxReplicas: 6}",
        );
        assert_eq!(wake_replicas(&record(5), &scaled.spec), 5);
        assert_eq!(wake_replicas(&record(9), &scaled.spec), 6);
        assert_eq!(wake_replicas(&record(1), &scaled.spec), 2);
    }

    #[test]
    fn hibernation_input_and_view_follow_the_request_and_the_record() {
        let spec = cluster_from_yaml("version: '1'").spec;
        let now = ts("2026-12-06T10:00:00Z");
        let serving = |desired, ready| ServingRelays {
            desired,
            ready,
            rolled_out: true,
            reported: 1,
        };
        // Asked: hibernate, recording what serves.
        assert_eq!(
            hibernation_input(Some(Source::Spec), None, &spec, false),
            Hibernation::Hibernate
        );
        let view = hibernation_view(
            Some(Source::Spec),
            None,
            &HibernationPlan::Hibernated,
            false,
            serving(1, 1),
            &spec,
            now,
        );
        assert_eq!(
            view,
            HibernationView::Hibernating {
                source: Source::Spec,
                record: HibernationStatus {
                    since: Time(now),
                    replicas: 1
                }
            }
        );
        // Later reconciles keep the first record.
        let later = hibernation_view(
            Some(Source::Spec),
            Some(&record(1)),
            &HibernationPlan::Hibernated,
            false,
            serving(0, 0),
            &spec,
            now,
        );
        assert_eq!(later.record(), Some(record(1)));
        // The rollout needs the relays: waiting, nothing recorded.
        let waiting = hibernation_view(
            Some(Source::Annotation),
            None,
            &HibernationPlan::Waiting("the rollout finishes first".into()),
            false,
            serving(1, 1),
            &spec,
            now,
        );
        assert!(matches!(waiting, HibernationView::Waiting { .. }));
        assert_eq!(waiting.record(), None);
        // A bootstrap restore runs: hibernation waits for it.
        assert_eq!(
            hibernation_input(Some(Source::Spec), None, &spec, true),
            Hibernation::Off
        );
        // No longer asked: wake until every relay is back, then forget the record.
        assert_eq!(
            hibernation_input(None, Some(&record(1)), &spec, false),
            Hibernation::Wake { replicas: 1 }
        );
        let waking = hibernation_view(
            None,
            Some(&record(1)),
            &HibernationPlan::Waking,
            false,
            serving(1, 0),
            &spec,
            now,
        );
        assert_eq!(
            waking,
            HibernationView::Waking {
                record: record(1),
                replicas: 1
            }
        );
        let awake = hibernation_view(
            None,
            Some(&record(1)),
            &HibernationPlan::Waking,
            false,
            serving(1, 1),
            &spec,
            now,
        );
        assert_eq!(awake, HibernationView::Off);
        // The reconcile that sees every relay back asks for the next, which brings the
        // autoscaler back; one still waking, or not waking, does not.
        assert!(wake_finished(&HibernationPlan::Waking, &awake));
        assert!(!wake_finished(&HibernationPlan::Waking, &waking));
        assert!(!wake_finished(&HibernationPlan::Off, &HibernationView::Off));
        assert_eq!(
            hibernation_input(None, None, &spec, false),
            Hibernation::Off
        );
    }
}
