//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas never
//! reconcile at once. The decision is a pure function ([`may_hold`]); the Lease writes
//! use optimistic concurrency, so two candidates racing for an expired lease cannot both
//! win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tracing::{info, warn};

/// A Lease call failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} Lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    action: &'static str,
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

/// Whether `identity` may take or keep a lease with `spec` at `now`: it is free, ours,
/// or its holder stopped renewing more than one lease duration ago.
pub fn may_hold(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            match &spec.renew_time {
                Some(MicroTime(renewed)) => {
                    now.duration_since(*renewed) > SignedDuration::from_secs(duration)
                }
                None => true,
            }
        }
    }
}

/// Campaigns for and renews one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    lease_duration: Duration,
}

impl LeaderElector {
    /// An elector for Lease `namespace/name` as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
        }
    }

    fn error(&self, action: &'static str) -> impl FnOnce(kube::Error) -> LeaseError + '_ {
        move |source| LeaseError {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// Takes or renews the lease; `Ok(false)` when another replica holds it or won a race.
    pub async fn try_acquire(&self) -> Result<bool, LeaseError> {
        let now = Timestamp::now();
        let existing = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.error("reading"))?;
        let duration = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        match existing {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                    Err(e) => Err(self.error("creating")(e)),
                }
            }
            Some(mut lease) => {
                if !may_hold(lease.spec.as_ref(), &self.identity, now) {
                    return Ok(false);
                }
                let mut spec = lease.spec.take().unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(&self.identity) {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.acquire_time = Some(MicroTime(now));
                    spec.holder_identity = Some(self.identity.clone());
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(duration);
                lease.spec = Some(spec);
                // `replace` carries the resourceVersion we read: a concurrent writer makes
                // this fail with 409 instead of both believing they lead.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
                    Err(e) => Err(self.error("updating")(e)),
                }
            }
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        let retry = self.lease_duration / 5;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    info!(identity = %self.identity, lease = %self.name, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the lease until a renewal has failed for a whole lease duration; returns
    /// then, and the caller must stop reconciling because another replica may lead.
    pub async fn keep(&self) {
        let period = self.lease_duration / 3;
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_acquire().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("lease taken by another replica");
                    return;
                }
                Err(e) => warn!(error = %e, "lease renewal failed"),
            }
            if last_renewal.elapsed() > self.lease_duration {
                warn!("could not renew the lease in time");
                return;
            }
        }
    }

    /// Gives the lease up so a standby replica takes over at once (on shutdown).
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let ours = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(&self.identity);
            if ours {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                }
                if let Err(e) = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    warn!(error = %e, "could not release the lease");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn free_or_own_lease_may_be_held() {
        let now = Timestamp::from_second(100).unwrap();
        assert!(may_hold(None, "a", now));
        assert!(may_hold(Some(&LeaseSpec::default()), "a", now));
        assert!(may_hold(Some(&spec("a", 99)), "a", now));
    }

    #[test]
    fn live_lease_of_another_is_respected() {
        let now = Timestamp::from_second(100).unwrap();
        assert!(!may_hold(Some(&spec("b", 90)), "a", now));
    }

    #[test]
    fn expired_lease_of_another_may_be_taken() {
        let now = Timestamp::from_second(100).unwrap();
        assert!(may_hold(Some(&spec("b", 80)), "a", now));
    }
}
