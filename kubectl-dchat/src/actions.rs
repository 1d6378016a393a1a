//! The commands that change something: each is an annotation on the DchatCluster that
//! the operator acts on (or, for `backup`, a new DchatBackup).
//!
//! Why annotations and not spec edits: a DchatCluster is usually applied from Git by
//! Argo CD or Flux. An annotation the manifest does not contain is not drift for them
//! (neither client-side nor server-side apply claims it), so a pause or a restart from
//! the plugin does not fight the GitOps tool, while an edit of `spec` would be reverted
//! at the next sync. The declarative twins (`spec.paused`, `spec.hibernate`) stay the
//! GitOps way; the plugin says when one of them overrides what it just did.
//!
//! [`plan`] decides, from the cluster as read, what to change, what to say and what
//! `--wait` waits for (pure, unit-tested); [`run`] reads, patches, prints and waits.

use std::io::Write;
use std::time::Duration;

use dchat_operator::api::RolloutStep;
use dchat_operator::commands::{annotate, create_backup_as, wait_for_backup};
use k8s_openapi::jiff::{Timestamp, Unit};

use crate::connect::Connection;
use crate::contract::{self, Check, RolloutIdentity};
use crate::error::Error;
use crate::status::fetch;
use crate::view::ClusterView;
use crate::wait::{say, until};

/// Field manager of every change the plugin makes, so `managedFields` tell who did it.
pub const FIELD_MANAGER: &str = "kubectl-dchat";

/// A change the operator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Promote the rollout awaiting promotion.
    Promote,
    /// Abort the rollout in flight.
    Abort,
    /// Restart the relays.
    Restart,
    /// Pause reconciliation.
    Pause,
    /// Resume reconciliation.
    Resume,
    /// Hibernate.
    Hibernate,
    /// Wake from hibernation.
    Wake,
}

/// What `--wait` waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// The rollout reaches Complete.
    RolloutComplete(RolloutIdentity),
    /// The rollout reaches Aborted.
    RolloutAborted(RolloutIdentity),
    /// Condition Paused True.
    Paused,
    /// Condition Paused not True.
    Resumed,
    /// Condition Hibernated is True.
    Hibernating,
    /// `status.hibernation` gone and the phase not Hibernating.
    Awake,
    /// Status records a restart at or after this time.
    Restarted(Timestamp),
}

impl Waiter {
    /// What is awaited, for people.
    pub fn describe(&self) -> String {
        match self {
            Self::RolloutComplete(_) => "the rollout to be Complete".into(),
            Self::RolloutAborted(_) => "the rollout to be Aborted".into(),
            Self::Paused => format!("condition {}=True", contract::PAUSED_CONDITION),
            Self::Resumed => format!("condition {} to leave True", contract::PAUSED_CONDITION),
            Self::Hibernating => format!("condition {}=True", contract::HIBERNATED_CONDITION),
            Self::Awake => format!(
                "{} to be gone",
                contract::field(contract::STATUS_HIBERNATION)
            ),
            Self::Restarted(at) => format!(
                "{} to reach {at}",
                contract::field(contract::STATUS_RESTARTED_AT)
            ),
        }
    }

    /// The predicate.
    pub fn check(&self, cluster: &ClusterView) -> Check {
        match self {
            Self::RolloutComplete(which) => contract::rollout_complete(cluster, which),
            Self::RolloutAborted(which) => contract::rollout_aborted(cluster, which),
            Self::Paused => contract::paused(cluster),
            Self::Resumed => contract::resumed(cluster),
            Self::Hibernating => contract::hibernating(cluster),
            Self::Awake => contract::awake(cluster),
            Self::Restarted(at) => contract::restarted(cluster, *at),
        }
    }
}

/// What a command does to a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Annotations to set (`Some`) or remove (`None`); empty: nothing to patch.
    pub changes: Vec<(&'static str, Option<String>)>,
    /// What was done, for people (printed after the patch).
    pub said: Vec<String>,
    /// Something that keeps the request from taking effect (printed to stderr).
    pub warnings: Vec<String>,
    /// What `--wait` waits for.
    pub waiter: Waiter,
}

fn target(cluster: &ClusterView) -> String {
    format!("dchatcluster {}/{}", cluster.namespace, cluster.name)
}

/// What `action` does to `cluster` at `now`, or why it is refused.
pub fn plan(action: Action, cluster: &ClusterView, now: Timestamp) -> Result<Plan, Error> {
    let stamp = now.to_string();
    let who = target(cluster);
    let resume_hint = format!(
        "kubectl dchat resume {} -n {}",
        cluster.name, cluster.namespace
    );
    let plan = match action {
        Action::Promote | Action::Abort => {
            let Some(r) = cluster.rollout().filter(|r| r.in_flight()) else {
                let what = if action == Action::Promote {
                    "promote"
                } else {
                    "abort"
                };
                let last = match cluster.rollout() {
                    Some(r) => format!("; the last one, of {}, ended {}", r.target_version, r.step),
                    None => String::new(),
                };
                return Err(Error::Refused(format!(
                    "DchatCluster \"{}\" in namespace \"{}\" has no rollout in flight: nothing to {what}{last}",
                    cluster.name, cluster.namespace
                )));
            };
            let from = r.from_version.as_deref().unwrap_or("(nothing)");
            let rollout = format!(
                "the rollout {from} -> {} (slot {}, step {})",
                r.target_version, r.slot, r.step
            );
            let step = r.known_step();
            if action == Action::Abort {
                Plan {
                    changes: vec![(contract::ABORT_ANNOTATION, Some(stamp))],
                    said: vec![format!(
                        "{who}: abort requested for {rollout}; traffic stays on or returns to {from}"
                    )],
                    warnings: vec![],
                    waiter: Waiter::RolloutAborted(r.identity()),
                }
            } else if step.is_some_and(RolloutStep::switched) {
                Plan {
                    changes: vec![],
                    said: vec![format!(
                        "{who}: {rollout} is promoted already; nothing to do"
                    )],
                    warnings: vec![],
                    waiter: Waiter::RolloutComplete(r.identity()),
                }
            } else {
                let when = if step == Some(RolloutStep::AwaitingPromotion) {
                    "traffic switches at the operator's next reconcile"
                } else {
                    "traffic switches as soon as the new version is validated"
                };
                Plan {
                    changes: vec![(contract::PROMOTE_ANNOTATION, Some(stamp))],
                    said: vec![format!("{who}: promote requested for {rollout}; {when}")],
                    warnings: vec![],
                    waiter: Waiter::RolloutComplete(r.identity()),
                }
            }
        }
        Action::Restart => {
            // Whole seconds: a restart stamp people can read and compare as text.
            let at = now.round(Unit::Second).unwrap_or(now);
            Plan {
                changes: vec![(contract::RESTARTED_AT_ANNOTATION, Some(at.to_string()))],
                said: vec![format!(
                    "{who}: restart requested ({}={at}); the operator restarts the relays",
                    contract::RESTARTED_AT_ANNOTATION
                )],
                warnings: paused_warning(cluster),
                waiter: Waiter::Restarted(at),
            }
        }
        Action::Pause => {
            let already = contract::annotation_pauses(cluster);
            let mut warnings = vec![];
            if contract::spec_paused(cluster) {
                warnings.push("spec.paused is true as well: resuming needs both removed".into());
            }
            Plan {
                changes: if already {
                    vec![]
                } else {
                    vec![(
                        contract::RECONCILE_ANNOTATION,
                        Some(contract::RECONCILE_PAUSED.to_string()),
                    )]
                },
                said: vec![format!(
                    "{who}: {} ({}={}); the operator changes nothing for it until `{resume_hint}`",
                    if already { "paused already" } else { "paused" },
                    contract::RECONCILE_ANNOTATION,
                    contract::RECONCILE_PAUSED
                )],
                warnings,
                waiter: Waiter::Paused,
            }
        }
        Action::Resume => {
            let present = cluster.annotation(contract::RECONCILE_ANNOTATION).is_some();
            let mut warnings = vec![];
            if contract::spec_paused(cluster) {
                warnings.push(contract::spec_still_pauses(cluster));
            }
            Plan {
                changes: if present {
                    vec![(contract::RECONCILE_ANNOTATION, None)]
                } else {
                    vec![]
                },
                said: vec![if present {
                    format!(
                        "{who}: resumed ({} removed); the operator manages it again",
                        contract::RECONCILE_ANNOTATION
                    )
                } else {
                    format!(
                        "{who}: no {} annotation to remove",
                        contract::RECONCILE_ANNOTATION
                    )
                }],
                warnings,
                waiter: Waiter::Resumed,
            }
        }
        Action::Hibernate => {
            let already = contract::annotation_hibernates(cluster);
            Plan {
                changes: if already {
                    vec![]
                } else {
                    vec![(
                        contract::HIBERNATION_ANNOTATION,
                        Some(contract::HIBERNATION_ON.to_string()),
                    )]
                },
                said: vec![format!(
                    "{who}: hibernation {} ({}={}); the relays scale to zero, volumes and \
                     configuration stay; `kubectl dchat wake {} -n {}` brings it back",
                    if already {
                        "requested already"
                    } else {
                        "requested"
                    },
                    contract::HIBERNATION_ANNOTATION,
                    contract::HIBERNATION_ON,
                    cluster.name,
                    cluster.namespace
                )],
                warnings: paused_warning(cluster),
                waiter: Waiter::Hibernating,
            }
        }
        Action::Wake => {
            let present = cluster
                .annotation(contract::HIBERNATION_ANNOTATION)
                .is_some();
            let mut warnings = paused_warning(cluster);
            if contract::spec_hibernates(cluster) {
                warnings.push(contract::spec_still_hibernates(cluster));
            }
            Plan {
                changes: if present {
                    vec![(contract::HIBERNATION_ANNOTATION, None)]
                } else {
                    vec![]
                },
                said: vec![if present {
                    format!(
                        "{who}: wake requested ({} removed); the relays start again",
                        contract::HIBERNATION_ANNOTATION
                    )
                } else {
                    format!(
                        "{who}: no {} annotation to remove",
                        contract::HIBERNATION_ANNOTATION
                    )
                }],
                warnings,
                waiter: Waiter::Awake,
            }
        }
    };
    Ok(plan)
}

/// A paused cluster does not act on other requests until resumed.
fn paused_warning(cluster: &ClusterView) -> Vec<String> {
    if contract::annotation_pauses(cluster) || contract::spec_paused(cluster) {
        vec![format!(
            "DchatCluster {}/{} is paused: the operator acts on this once it is resumed",
            cluster.namespace, cluster.name
        )]
    } else {
        vec![]
    }
}

/// Runs `action` on DchatCluster `name`: read, patch, say what happened and how to
/// watch it, and with `wait` wait for the operator (at most that long).
pub async fn run(
    conn: &Connection,
    action: Action,
    name: &str,
    wait: Option<Duration>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let namespace = conn.namespace.as_str();
    let cluster = fetch::cluster(&conn.client, namespace, name).await?;
    let plan = plan(action, &cluster, Timestamp::now())?;
    if !plan.changes.is_empty() {
        annotate(
            conn.client.clone(),
            namespace,
            name,
            &plan.changes,
            FIELD_MANAGER,
        )
        .await
        .map_err(Error::from_command)?;
    }
    for line in &plan.said {
        say(out, line)?;
    }
    for warning in &plan.warnings {
        say(err, &format!("warning: {warning}"))?;
    }
    let Some(timeout) = wait else {
        say(
            out,
            &format!("watch it: kubectl dchat status {name} -n {namespace}, or add --wait"),
        )?;
        return Ok(());
    };
    let what = plan.waiter.describe();
    let done = until(&conn.client, namespace, name, &what, timeout, out, |c| {
        plan.waiter.check(c)
    })
    .await?;
    say(out, &format!("done: {done}"))
}

/// `backup`: creates a DchatBackup of `name`; with `wait`, waits until it is Completed
/// (or fails when it Failed).
pub async fn backup(
    conn: &Connection,
    name: &str,
    wait: Option<Duration>,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let namespace = conn.namespace.as_str();
    let backup = create_backup_as(conn.client.clone(), namespace, name, FIELD_MANAGER)
        .await
        .map_err(Error::from_backup)?;
    say(out, &format!("dchatbackup {namespace}/{backup} created"))?;
    let Some(timeout) = wait else {
        say(
            out,
            &format!("watch it: kubectl get dchatbackup {backup} -n {namespace} -w, or add --wait"),
        )?;
        return Ok(());
    };
    say(
        out,
        &format!(
            "waiting for it to complete (at most {})",
            crate::style::duration(timeout.as_secs() as i64)
        ),
    )?;
    let status = wait_for_backup(conn.client.clone(), namespace, &backup, timeout)
        .await
        .map_err(Error::from_backup)?;
    say(
        out,
        &format!(
            "done: Completed, {} at {}",
            crate::style::bytes(status.size_bytes.unwrap_or_default()),
            status.location.unwrap_or_default()
        ),
    )
}

#[cfg(test)]
mod tests;
