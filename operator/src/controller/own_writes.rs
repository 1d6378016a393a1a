//! The operator's own writes of the objects it watches, so that their echoes start no
//! reconcile.
//!
//! Every write of a child (a server-side apply, a replica patch) and of a DchatCluster's
//! metadata (its finalizer, consumed rollout annotations) comes back as a watch event.
//! The reconcile that wrote it already knew what it wrote, so a reconcile started by the
//! echo only reads it back: during a rollout the re-pointed HorizontalPodAutoscaler and
//! the monitoring objects and ConfigMap re-applied with the new version label each
//! started one. The response to a write carries the object's new `resourceVersion`, and
//! the watch event of that write carries the same one; a change of anyone else (another
//! controller, a person) has a `resourceVersion` of its own and is passed on as before
//! (`triggers.rs`).
//!
//! The response and the watch event travel separately, and on a busy machine the event
//! can be read first. So a write is announced before it is sent ([`OwnWrites::track`]),
//! and an event of an object with a write in flight waits for that write's response
//! (at most [`RESPONSE_WAIT`]) before it is judged. An entry whose echo never comes (a
//! write that changed nothing, an echo passed on after that wait) never matches a later
//! event, since every write has a new `resourceVersion`; entries are bounded per object
//! and dropped with it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use tokio::sync::Notify;

/// How many unanswered writes of one object are remembered: a reconcile writes an object
/// at most twice (a StatefulSet's replica handover, then its apply).
const PER_OBJECT: usize = 4;

/// How long a watch event of an object waits for the response of a write of it in
/// flight. Past it the event is passed on (a reconcile too many, as without this).
pub const RESPONSE_WAIT: Duration = Duration::from_secs(1);

/// The operator's writes of watched objects: those in flight, by namespace and name, and
/// the `resourceVersion`s the answered ones gave each object (by uid) whose watch events
/// have not arrived yet.
#[derive(Debug, Default)]
pub struct OwnWrites {
    answered: Mutex<HashMap<String, Vec<String>>>,
    in_flight: Mutex<HashMap<(String, String), usize>>,
    settled: Notify,
}

/// A write in flight ([`OwnWrites::begin`]); its end is announced when it is dropped,
/// after its response was recorded (or it failed).
#[must_use = "the write is in flight until this is dropped"]
pub struct InFlight {
    writes: Arc<OwnWrites>,
    key: (String, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut in_flight = lock(&self.writes.in_flight);
            if let Some(count) = in_flight.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    in_flight.remove(&self.key);
                }
            }
        }
        self.writes.settled.notify_waiters();
    }
}

impl OwnWrites {
    /// Announces a write of the object `name` in `namespace` (of any kind) about to be
    /// sent; record its response with [`OwnWrites::record`] before dropping the guard.
    pub fn begin(self: &Arc<Self>, namespace: &str, name: &str) -> InFlight {
        let key = (namespace.to_string(), name.to_string());
        *lock(&self.in_flight).entry(key.clone()).or_default() += 1;
        InFlight {
            writes: self.clone(),
            key,
        }
    }

    /// Sends `write` (of the object `name` in `namespace`) announced as in flight, and
    /// records the object it returns: the one way the effects write watched objects.
    pub async fn track<K, E>(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        write: impl Future<Output = Result<K, E>>,
    ) -> Result<K, E>
    where
        K: Resource,
    {
        let _in_flight = self.begin(namespace, name);
        let written = write.await?;
        self.record(written.meta());
        Ok(written)
    }

    /// Remembers the object a write of the operator returned.
    pub fn record(&self, written: &ObjectMeta) {
        let (Some(uid), Some(version)) = (&written.uid, &written.resource_version) else {
            return;
        };
        let mut answered = lock(&self.answered);
        let versions = answered.entry(uid.clone()).or_default();
        if versions.contains(version) {
            // A write that changed nothing returns the version it found: no event comes.
            return;
        }
        if versions.len() == PER_OBJECT {
            versions.remove(0);
        }
        versions.push(version.clone());
    }

    /// Whether a watch event of the object `seen` is the echo of one of the operator's
    /// answered writes; forgets that write, and the earlier ones, whose events came
    /// before it.
    pub fn is_echo(&self, seen: &ObjectMeta) -> bool {
        let (Some(uid), Some(version)) = (&seen.uid, &seen.resource_version) else {
            return false;
        };
        let mut answered = lock(&self.answered);
        let Some(versions) = answered.get_mut(uid) else {
            return false;
        };
        let Some(position) = versions.iter().position(|v| v == version) else {
            return false;
        };
        versions.drain(..=position);
        if versions.is_empty() {
            answered.remove(uid);
        }
        true
    }

    /// Whether a write of the object `seen` (by namespace and name) is in flight.
    pub fn writing(&self, seen: &ObjectMeta) -> bool {
        let (Some(namespace), Some(name)) = (&seen.namespace, &seen.name) else {
            return false;
        };
        lock(&self.in_flight).contains_key(&(namespace.clone(), name.clone()))
    }

    /// [`OwnWrites::is_echo`] once no write of the object is in flight (or after
    /// [`RESPONSE_WAIT`]): for an event that may have overtaken its write's response.
    pub async fn is_echo_once_answered(&self, seen: &ObjectMeta) -> bool {
        let waited = tokio::time::timeout(RESPONSE_WAIT, async {
            loop {
                let settled = self.settled.notified();
                tokio::pin!(settled);
                // Registered before looking, so a write ending in between wakes it.
                settled.as_mut().enable();
                if !self.writing(seen) {
                    return;
                }
                settled.await;
            }
        });
        let _ = waited.await;
        self.is_echo(seen)
    }

    /// Forgets an object that was deleted.
    pub fn forget(&self, deleted: &ObjectMeta) {
        if let Some(uid) = &deleted.uid {
            lock(&self.answered).remove(uid);
        }
    }

    /// How many objects have answered writes whose events have not arrived.
    pub fn pending(&self) -> usize {
        lock(&self.answered).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: &str, version: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some("apps".into()),
            name: Some(format!("object-{uid}")),
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn the_echo_of_a_write_is_recognised_once_and_other_changes_are_not() {
        let writes = OwnWrites::default();
        writes.record(&meta("a", "10"));
        assert!(
            !writes.is_echo(&meta("a", "9")),
            "an earlier change of someone else"
        );
        assert!(!writes.is_echo(&meta("b", "10")), "another object");
        assert!(writes.is_echo(&meta("a", "10")));
        assert!(!writes.is_echo(&meta("a", "10")), "recognised once");
        assert!(!writes.is_echo(&meta("a", "11")), "a later change");
        assert_eq!(writes.pending(), 0);
    }

    #[test]
    fn two_writes_of_one_object_are_each_recognised_and_an_echo_forgets_earlier_ones() {
        let writes = OwnWrites::default();
        writes.record(&meta("a", "10"));
        writes.record(&meta("a", "12"));
        assert!(writes.is_echo(&meta("a", "10")));
        assert!(
            !writes.is_echo(&meta("a", "11")),
            "someone else's, in between"
        );
        assert!(writes.is_echo(&meta("a", "12")));

        // The echo of the first write was passed on before its response came: the
        // second one is still recognised, and the first forgotten with it.
        writes.record(&meta("a", "20"));
        writes.record(&meta("a", "22"));
        assert!(writes.is_echo(&meta("a", "22")));
        assert_eq!(writes.pending(), 0);
    }

    #[test]
    fn a_write_that_changed_nothing_is_remembered_once_and_entries_are_bounded() {
        let writes = OwnWrites::default();
        writes.record(&meta("a", "10"));
        writes.record(&meta("a", "10"));
        for version in 11..20 {
            writes.record(&meta("a", &version.to_string()));
        }
        assert!(!writes.is_echo(&meta("a", "10")), "pushed out");
        assert!(writes.is_echo(&meta("a", "19")));
        writes.record(&meta("b", "5"));
        writes.forget(&meta("b", "6"));
        assert_eq!(writes.pending(), 0);
        writes.record(&ObjectMeta::default());
        assert_eq!(writes.pending(), 0, "no uid: nothing to match");
    }

    #[tokio::test]
    async fn an_echo_that_overtook_its_response_waits_for_it() {
        let writes = Arc::new(OwnWrites::default());
        let writing = writes.begin("apps", "object-a");
        assert!(writes.writing(&meta("a", "10")));
        let judged = tokio::spawn({
            let writes = writes.clone();
            async move { writes.is_echo_once_answered(&meta("a", "10")).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!judged.is_finished(), "judged before the response came");
        writes.record(&meta("a", "10"));
        drop(writing);
        assert!(judged.await.expect("the judging task"));
        assert!(!writes.writing(&meta("a", "10")));

        // A failed write (no response recorded): someone else's change is passed on.
        let failing = writes.begin("apps", "object-a");
        let judged = tokio::spawn({
            let writes = writes.clone();
            async move { writes.is_echo_once_answered(&meta("a", "11")).await }
        });
        drop(failing);
        assert!(!judged.await.expect("the judging task"));
    }

    #[tokio::test]
    async fn a_write_that_never_ends_holds_an_event_for_the_response_wait_then_passes_it() {
        let writes = Arc::new(OwnWrites::default());
        let _writing = writes.begin("apps", "object-a");
        let started = tokio::time::Instant::now();
        assert!(!writes.is_echo_once_answered(&meta("a", "10")).await);
        assert!(started.elapsed() >= RESPONSE_WAIT);
    }
}
