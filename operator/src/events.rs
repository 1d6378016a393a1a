//! Kubernetes Events (`events.k8s.io/v1`) about the operator's objects.
//!
//! An Event repeated within [`SERIES_WINDOW`] of its last occurrence (same object, type,
//! reason, action and note) is counted in the first one's `series` instead of being
//! written again; a different note is an Event of its own. What is remembered for that
//! is bounded ([`REMEMBERED`] Events, a hash and a name each), so the operator's memory
//! does not grow with the number of Events a fleet's rollout publishes.
//!
//! kube-runtime's `Recorder` keeps every Event it published in the last six minutes,
//! whole, keyed by the object's `resourceVersion` (which changes with nearly every
//! status write, so repeats were seldom counted) and without the note (so a repeat with
//! a different note would have been shown with the first one's).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use lru::LruCache;

/// How long after its last occurrence a repeat still counts in an Event's series (as
/// Kubernetes' own event recorder).
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// How many Events are remembered for counting repeats; the least recently seen is
/// forgotten first (its next repeat makes a new Event).
pub const REMEMBERED: usize = 4096;

/// Whether an Event is `Normal` or a `Warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Something happened as it should.
    Normal,
    /// Something a person may need to look at.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One Event to publish about an object.
#[derive(Clone, Debug)]
pub struct Occurrence<'a> {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason (`RolloutStarted`).
    pub reason: &'a str,
    /// What the operator did or failed to do (`Reconcile`).
    pub action: &'a str,
    /// The human-readable message.
    pub note: &'a str,
}

/// Which write an occurrence needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A new Event.
    Create,
    /// The repeat `count` of the Event `name` (the first occurrence is 1).
    Repeat {
        /// The Event's name.
        name: String,
        /// Occurrences so far, this one included.
        count: i32,
    },
}

/// The remembered Events: which Event an occurrence repeats, if any. Pure; the
/// [`EventRecorder`] does the writes.
#[derive(Debug)]
pub struct Correlator {
    seen: LruCache<u64, Seen>,
}

#[derive(Debug)]
struct Seen {
    name: String,
    count: i32,
    last: Timestamp,
}

impl Correlator {
    /// A correlator remembering at most `capacity` Events (at least one).
    pub fn new(capacity: usize) -> Self {
        Correlator {
            seen: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// What an occurrence with `key` ([`occurrence_key`]) needs at `now`.
    pub fn write(&mut self, key: u64, now: Timestamp) -> Write {
        match self.seen.get(&key) {
            Some(seen) if now.duration_since(seen.last) <= SERIES_WINDOW => Write::Repeat {
                name: seen.name.clone(),
                count: seen.count.saturating_add(1),
            },
            _ => Write::Create,
        }
    }

    /// Remembers that the Event `name` was written for `key` at `now`, `count` times so far.
    pub fn written(&mut self, key: u64, name: String, count: i32, now: Timestamp) {
        self.seen.put(
            key,
            Seen {
                name,
                count,
                last: now,
            },
        );
    }

    /// Forgets `key` (its Event is gone).
    pub fn forget(&mut self, key: u64) {
        self.seen.pop(&key);
    }

    /// How many Events are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no Event is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// What makes two occurrences the same Event: the object (not its `resourceVersion`),
/// type, reason, action and note.
pub fn occurrence_key(regarding: &ObjectReference, occurrence: &Occurrence<'_>) -> u64 {
    let mut hasher = DefaultHasher::new();
    regarding.api_version.hash(&mut hasher);
    regarding.kind.hash(&mut hasher);
    regarding.namespace.hash(&mut hasher);
    regarding.name.hash(&mut hasher);
    regarding.uid.hash(&mut hasher);
    regarding.field_path.hash(&mut hasher);
    occurrence.type_.hash(&mut hasher);
    occurrence.reason.hash(&mut hasher);
    occurrence.action.hash(&mut hasher);
    occurrence.note.hash(&mut hasher);
    hasher.finish()
}

/// Publishes Events as one controller instance; cheap to share.
pub struct EventRecorder {
    client: Client,
    controller: String,
    instance: String,
    correlator: Mutex<Correlator>,
}

impl EventRecorder {
    /// Publishes as `controller` (`reportingController`) from `instance`
    /// (`reportingInstance`, the controller's name when `None`).
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        EventRecorder {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            correlator: Mutex::new(Correlator::new(REMEMBERED)),
        }
    }

    /// Publishes `occurrence` about `regarding`, in its namespace (`default` for an
    /// object without one): a new Event, or a repeat counted in the earlier one's series.
    /// A repeat whose Event is gone (Events expire on the API server) makes a new one.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        occurrence: &Occurrence<'_>,
    ) -> Result<(), kube::Error> {
        let key = occurrence_key(regarding, occurrence);
        let now = Timestamp::now();
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let write = self.correlator().write(key, now);
        if let Write::Repeat { name, count } = write {
            let patch = serde_json::json!({
                "series": EventSeries { count, last_observed_time: MicroTime(now) },
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.correlator().written(key, name, count, now);
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    self.correlator().forget(key);
                }
                Err(e) => return Err(e),
            }
        }
        let event = self.event(regarding, occurrence, now);
        let created = api.create(&PostParams::default(), &event).await?;
        let name = created
            .metadata
            .name
            .or(event.metadata.name)
            .unwrap_or_default();
        self.correlator().written(key, name, 1, now);
        Ok(())
    }

    fn correlator(&self) -> std::sync::MutexGuard<'_, Correlator> {
        self.correlator.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        occurrence: &Occurrence<'_>,
        now: Timestamp,
    ) -> Event {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        Event {
            metadata: ObjectMeta {
                // Unique per object and nanosecond, as kubectl and client-go name them.
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(occurrence.type_.as_str().to_string()),
            reason: Some(occurrence.reason.to_string()),
            action: Some(occurrence.action.to_string()),
            note: Some(occurrence.note.to_string()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(resource_version: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("dchat.network/v1alpha1".into()),
            kind: Some("DchatCluster".into()),
            namespace: Some("chat".into()),
            name: Some("prod".into()),
            uid: Some("u-1".into()),
            resource_version: Some(resource_version.into()),
            field_path: None,
        }
    }

    fn started(note: &str) -> Occurrence<'_> {
        Occurrence {
            type_: EventType::Normal,
            reason: "RolloutStarted",
            action: "Reconcile",
            note,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn a_repeat_is_counted_in_the_first_events_series_whatever_the_resource_version() {
        let mut correlator = Correlator::new(8);
        let key = occurrence_key(&cluster("100"), &started("1.0 to 1.1"));
        assert_eq!(correlator.write(key, at(0)), Write::Create);
        correlator.written(key, "prod.1".into(), 1, at(0));
        let again = occurrence_key(&cluster("101"), &started("1.0 to 1.1"));
        assert_eq!(again, key, "the resourceVersion is not part of the Event");
        assert_eq!(
            correlator.write(again, at(60)),
            Write::Repeat {
                name: "prod.1".into(),
                count: 2
            }
        );
        correlator.written(again, "prod.1".into(), 2, at(60));
        // The window runs from the last occurrence, not the first.
        assert_eq!(
            correlator.write(key, at(60 + 6 * 60)),
            Write::Repeat {
                name: "prod.1".into(),
                count: 3
            }
        );
        assert_eq!(correlator.write(key, at(60 + 6 * 60 + 1)), Write::Create);
    }

    #[test]
    fn a_different_note_reason_type_or_object_is_an_event_of_its_own() {
        let base = occurrence_key(&cluster("1"), &started("1.0 to 1.1"));
        let other_note = occurrence_key(&cluster("1"), &started("1.1 to 1.2"));
        let other_reason = occurrence_key(
            &cluster("1"),
            &Occurrence {
                reason: "Promoted",
                ..started("1.0 to 1.1")
            },
        );
        let warning = occurrence_key(
            &cluster("1"),
            &Occurrence {
                type_: EventType::Warning,
                ..started("1.0 to 1.1")
            },
        );
        let other_object = occurrence_key(
            &ObjectReference {
                name: Some("staging".into()),
                ..cluster("1")
            },
            &started("1.0 to 1.1"),
        );
        let keys = [base, other_note, other_reason, warning, other_object];
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn what_is_remembered_is_bounded_and_the_least_recently_seen_goes_first() {
        let mut correlator = Correlator::new(2);
        for key in 0..3u64 {
            correlator.written(key, format!("e{key}"), 1, at(0));
        }
        assert_eq!(correlator.len(), 2);
        assert_eq!(correlator.write(0, at(1)), Write::Create, "forgotten");
        assert!(matches!(correlator.write(2, at(1)), Write::Repeat { .. }));
        correlator.forget(2);
        assert_eq!(correlator.write(2, at(1)), Write::Create);
    }
}
