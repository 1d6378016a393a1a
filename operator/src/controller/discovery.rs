//! Which optional kinds the API server serves.
//!
//! ServiceMonitor and PrometheusRule exist only where the Prometheus Operator's CRDs are
//! installed (not on kind, not on most development clusters). The operator asks API
//! discovery instead of listing them and reading a 404: the API server answers a request
//! for an unserved group with a plain-text `404 page not found`, not a `Status`, which a
//! client cannot tell apart from other failures. Discovery runs once before the first
//! reconcile and again every [`DISCOVERY_INTERVAL`]; when the answer changes, every
//! cluster is reconciled, so CRDs installed later get their objects without a restart.

use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

pub use crate::build::OptionalKinds;

/// How often the operator asks discovery again.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

/// The group/version the Prometheus Operator serves its kinds under.
const MONITORING_GROUP_VERSION: &str = "monitoring.coreos.com/v1";

/// The last discovery answer, shared by every reconcile.
#[derive(Debug, Default)]
pub struct Capabilities {
    kinds: RwLock<Option<OptionalKinds>>,
}

impl Capabilities {
    /// Capabilities fixed at `kinds` (tests, and `render`); never discovered.
    pub fn fixed(kinds: OptionalKinds) -> Self {
        Self {
            kinds: RwLock::new(Some(kinds)),
        }
    }

    /// The last answer, or `None` before the first discovery.
    pub fn get(&self) -> Option<OptionalKinds> {
        *self.kinds.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an answer; true when it differs from the previous one.
    pub fn set(&self, kinds: OptionalKinds) -> bool {
        let mut current = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != Some(kinds);
        *current = Some(kinds);
        changed
    }

    /// Records that `kind` stopped being served (a request for it answered 404 between
    /// two discoveries, e.g. its CRD was deleted).
    pub fn forget(&self, kind: &str) {
        let mut current = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        if let Some(kinds) = current.as_mut() {
            *kinds = kinds.without(kind);
        }
    }
}

/// Asks the API server which optional kinds it serves. The group list first: asking for
/// an unserved group version answers a plain-text 404 (which kube logs as a warning).
pub async fn discover(client: &Client) -> Result<OptionalKinds, kube::Error> {
    let groups = client.list_api_groups().await?;
    let served = groups.groups.iter().any(|g| {
        g.versions
            .iter()
            .any(|v| v.group_version == MONITORING_GROUP_VERSION)
    });
    if !served {
        return Ok(OptionalKinds::NONE);
    }
    match client
        .list_api_group_resources(MONITORING_GROUP_VERSION)
        .await
    {
        Ok(list) => Ok(OptionalKinds::from_monitoring_resources(
            list.resources.iter().map(|r| r.name.as_str()),
        )),
        // Removed between the two requests. The body is plain text: only the code says it.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(OptionalKinds::NONE),
        Err(e) => Err(e),
    }
}

/// Whether the API server serves the DchatBackup kind (its CRD is installed: Helm
/// installs CRDs only on first install, so an upgrade may lack it).
pub async fn serves_backups(client: &Client) -> Result<bool, kube::Error> {
    let group_version = format!("{}/{}", crate::api::GROUP, crate::api::VERSION);
    let groups = client.list_api_groups().await?;
    let served = groups
        .groups
        .iter()
        .any(|g| g.versions.iter().any(|v| v.group_version == group_version));
    if !served {
        return Ok(false);
    }
    match client.list_api_group_resources(&group_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "dchatbackups")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Asks discovery every `interval` and records the answer; counts up `changes` when it
/// differs from the last one. Runs until every receiver is dropped.
pub async fn keep_discovering(
    client: Client,
    capabilities: std::sync::Arc<Capabilities>,
    interval: Duration,
    changes: watch::Sender<u64>,
) {
    loop {
        match discover(&client).await {
            Ok(kinds) => {
                let before = capabilities.get();
                if capabilities.set(kinds) {
                    if before.is_some() {
                        info!(?kinds, "the optional kinds the API server serves changed");
                    }
                    changes.send_modify(|n| *n += 1);
                    if changes.is_closed() {
                        return;
                    }
                }
            }
            // Keep the last answer: an API server that does not answer now is no news
            // about which CRDs are installed.
            Err(e) => warn!(error = %e, "API discovery failed; keeping the last answer"),
        }
        tokio::time::sleep(interval).await;
    }
}

/// How long a watch of an optional kind that was answered 404 (its CRD went away between
/// two discoveries) waits before it is tried again, unless discovery's answer changes
/// first.
const NOT_FOUND_RETRY: Duration = DISCOVERY_INTERVAL;

/// The items of the stream `start` makes, for as long as discovery says the API server
/// serves `kind`: the stream is started when it is served and dropped, with a call to
/// `stopped`, when it is not any more. A 404 from the stream means the kind went away
/// before discovery noticed: the stream is dropped the same way, the error is not passed
/// on (a controller would back off every watch for it), and it is started again after
/// discovery's answer changes or [`NOT_FOUND_RETRY`].
pub fn while_served<T, S>(
    kind: String,
    capabilities: Arc<Capabilities>,
    changes: watch::Receiver<u64>,
    start: impl FnMut() -> S + Send + 'static,
    stopped: impl FnMut() + Send + 'static,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send
where
    T: Send + 'static,
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
{
    struct Switch<S, F, G> {
        kind: String,
        capabilities: Arc<Capabilities>,
        /// `None` once the discovery task has ended: the last answer stands.
        changes: Option<watch::Receiver<u64>>,
        start: F,
        stopped: G,
        current: Option<Pin<Box<S>>>,
        retry_at: Option<Instant>,
    }
    let switch = Switch {
        kind,
        capabilities,
        changes: Some(changes),
        start,
        stopped,
        current: None,
        retry_at: None,
    };
    futures::stream::unfold(switch, |mut s| async move {
        loop {
            let served = s.capabilities.get().is_some_and(|k| k.serves(&s.kind));
            if served && s.current.is_none() && s.retry_at.is_none() {
                s.current = Some(Box::pin((s.start)()));
            } else if !served && s.current.is_some() {
                s.current = None;
                (s.stopped)();
            }
            let changed = async {
                match &mut s.changes {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let next = async {
                match &mut s.current {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match s.retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                open = changed => {
                    if !open {
                        s.changes = None;
                    }
                    s.retry_at = None;
                }
                () = retry => s.retry_at = None,
                item = next => match item {
                    Some(Err(e)) if is_not_found(&e) => {
                        info!(kind = %s.kind, "no longer served; watching it again when discovery finds it");
                        s.current = None;
                        (s.stopped)();
                        s.retry_at = Some(Instant::now() + NOT_FOUND_RETRY);
                    }
                    Some(item) => return Some((item, s)),
                    // A watcher does not end; if it did, it is started again.
                    None => {
                        s.current = None;
                        (s.stopped)();
                    }
                },
            }
        }
    })
}

/// Whether a watch failed because the API server does not serve its kind.
fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_report_changes_and_forget_kinds() {
        let caps = Capabilities::default();
        assert_eq!(caps.get(), None);
        assert!(caps.set(OptionalKinds::ALL));
        assert!(!caps.set(OptionalKinds::ALL), "same answer is no change");
        caps.forget("ServiceMonitor");
        assert_eq!(
            caps.get(),
            Some(OptionalKinds {
                service_monitor: false,
                prometheus_rule: true
            })
        );
        assert!(caps.set(OptionalKinds::ALL), "back again is a change");
    }

    fn api_error(code: u16) -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..kube::core::Status::default()
        })))
    }

    #[tokio::test]
    async fn a_watch_runs_while_its_kind_is_served() {
        use futures::channel::mpsc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        type Item = Result<u32, watcher::Error>;
        let capabilities = Arc::new(Capabilities::default());
        let (changes, rx) = watch::channel(0_u64);
        let sender: Arc<Mutex<Option<mpsc::UnboundedSender<Item>>>> = Arc::default();
        let (starts, stops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let stream = while_served(
            "ServiceMonitor".into(),
            capabilities.clone(),
            rx,
            {
                let (sender, starts) = (sender.clone(), starts.clone());
                move || {
                    let (tx, rx) = mpsc::unbounded();
                    *sender.lock().unwrap() = Some(tx);
                    starts.fetch_add(1, Ordering::SeqCst);
                    rx
                }
            },
            {
                let stops = stops.clone();
                move || {
                    stops.fetch_add(1, Ordering::SeqCst);
                }
            },
        );
        futures::pin_mut!(stream);
        let send = |item: Item| {
            if let Some(tx) = sender.lock().unwrap().as_ref() {
                let _ = tx.unbounded_send(item);
            }
        };
        let quiet = Duration::from_millis(50);
        let count = |n: &Arc<AtomicUsize>| n.load(Ordering::SeqCst);

        // Before discovery has answered, and while it says not served: no watch.
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        capabilities.set(OptionalKinds::NONE);
        changes.send_modify(|n| *n += 1);
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        assert_eq!(count(&starts), 0);

        // Served: watched, its items and its other errors passed on.
        capabilities.set(OptionalKinds::ALL);
        changes.send_modify(|n| *n += 1);
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        assert_eq!(count(&starts), 1);
        send(Ok(1));
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        send(Err(api_error(403)));
        assert!(stream.next().await.unwrap().is_err());

        // A 404 before discovery noticed: stopped, not passed on, not restarted at once.
        send(Err(api_error(404)));
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        assert_eq!((count(&starts), count(&stops)), (1, 1));

        // Discovery's answer changes: started again.
        changes.send_modify(|n| *n += 1);
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        assert_eq!(count(&starts), 2);
        send(Ok(2));
        assert_eq!(stream.next().await.unwrap().unwrap(), 2);

        // No longer served: stopped.
        capabilities.set(OptionalKinds::ALL.without("ServiceMonitor"));
        changes.send_modify(|n| *n += 1);
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        assert_eq!((count(&starts), count(&stops)), (2, 2));
        send(Ok(3));
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());

        // The discovery task ended: the last answer stands, nothing hangs or spins.
        drop(changes);
        assert!(tokio::time::timeout(quiet, stream.next()).await.is_err());
        assert_eq!((count(&starts), count(&stops)), (2, 2));
    }
}
