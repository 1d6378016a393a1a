//! The effects of the day-2 requests ([`crate::day2`]): a paused cluster's status (and
//! nothing else), the rollout timers of a cluster whose pause ended, and the Events of
//! restart requests.

use std::sync::Arc;

use crate::events::EventType;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use tracing::info;

use super::report::{patch_status, publish};
use super::{status, Context, Error};
use crate::api::DchatCluster;
use crate::day2::{self, RestartNews, Source};
use crate::rollout;

/// Reconciles a paused cluster: its status says so, nothing else is read or written.
/// The finalizer was added before (so deletion still cleans up); the watch brings the
/// change that resumes it.
pub(super) async fn pause(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    source: Source,
    now: Timestamp,
) -> Result<Action, Error> {
    let next = status::paused(cluster, source, now);
    let name = status::display_name(cluster);
    ctx.metrics.set_phase(&name, next.phase);
    ctx.metrics.set_paused(&name, true);
    if cluster.status.as_ref() == Some(&next) {
        return Ok(Action::await_change());
    }
    let newly = cluster
        .status
        .as_ref()
        .and_then(status::paused_since)
        .is_none();
    if newly && ctx.announced.first(cluster, "pause", "paused") {
        let message = next
            .conditions
            .iter()
            .find(|c| c.type_ == status::PAUSED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        info!(%message, "reconciliation paused");
        publish(
            ctx,
            cluster,
            EventType::Normal,
            day2::reason::PAUSED,
            message,
        )
        .await;
    }
    patch_status(cluster, ctx, namespace, &next).await?;
    Ok(Action::await_change())
}

/// The cluster as this reconcile sees it after a pause ended: a rollout in flight has
/// its timers moved forward by the time paused ([`rollout::resumed`]), so no timeout or
/// window counts time in which the operator did not look. The status write at the end
/// of the reconcile records the moved timers together with the end of the pause, so it
/// happens once.
pub(super) async fn resume(
    cluster: Arc<DchatCluster>,
    ctx: &Context,
    now: Timestamp,
) -> Arc<DchatCluster> {
    ctx.metrics
        .set_paused(&status::display_name(&cluster), false);
    let Some(since) = cluster.status.as_ref().and_then(status::paused_since) else {
        return cluster;
    };
    let paused_for = now.duration_since(since);
    let paused_for = if paused_for.is_negative() {
        std::time::Duration::ZERO
    } else {
        paused_for.unsigned_abs()
    };
    let mut resumed = (*cluster).clone();
    let mut message = format!(
        "reconciliation resumed after {} paused",
        rollout::human(std::time::Duration::from_secs(paused_for.as_secs()))
    );
    if let Some(status) = resumed.status.as_mut() {
        if let Some(r) = status.rollout.as_ref().filter(|r| r.step.in_flight()) {
            message.push_str(&format!(
                "; the rollout of version {} continues at step {}, its timers not counting the time paused",
                r.target_version, r.step
            ));
            status.rollout = Some(rollout::resumed(r, paused_for));
        }
    }
    if ctx.announced.first(&cluster, "pause", "resumed") {
        info!(%message, "reconciliation resumed");
        publish(
            ctx,
            &cluster,
            EventType::Normal,
            day2::reason::RESUMED,
            message,
        )
        .await;
    }
    Arc::new(resumed)
}

/// Announces a restart request once: taken up, or ignored as not newer than the last.
pub(super) async fn announce_restart(cluster: &DchatCluster, ctx: &Context, hibernating: bool) {
    match day2::restart_news(cluster) {
        RestartNews::None => {}
        RestartNews::Requested(at) => {
            let value = day2::marker_value(at);
            if ctx.announced.first(cluster, "restart", &value) {
                let how = if hibernating {
                    "the relays are at zero; the restart rolls out after the wake"
                } else {
                    "every relay is replaced by a blue-green rollout of the current spec (new slot, validation, switch)"
                };
                publish(
                    ctx,
                    cluster,
                    EventType::Normal,
                    day2::reason::RESTART_REQUESTED,
                    format!("restart requested for {value}: {how}"),
                )
                .await;
            }
        }
        RestartNews::Ignored { requested, last } => {
            let value = day2::marker_value(requested);
            if ctx.announced.first(cluster, "restart-ignored", &value) {
                publish(
                    ctx,
                    cluster,
                    EventType::Normal,
                    day2::reason::RESTART_IGNORED,
                    format!(
                        "restart request {value} ignored: not newer than the last restart acted on, {}",
                        day2::marker_value(last)
                    ),
                )
                .await;
            }
        }
    }
}
