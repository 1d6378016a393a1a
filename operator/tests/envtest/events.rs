//! The operator's Event recorder on a real API server: a repeat is counted in the first
//! Event's series (the API server accepts the series patch), a different note is an Event
//! of its own, and a repeat whose Event is gone makes a new one.

use dchat_operator::events::{EventRecorder, EventType, Occurrence};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use kube::api::DeleteParams;

use crate::support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_counted_and_a_gone_event_is_made_again() {
    let Some(env) = Env::shared("events").await else {
        return;
    };
    let recorder = EventRecorder::new(env.admin.clone(), "dchat-operator", None);
    let regarding = ObjectReference {
        api_version: Some("dchat.network/v1alpha1".into()),
        kind: Some("DchatCluster".into()),
        namespace: Some(env.ns.clone()),
        name: Some("prod".into()),
        uid: Some("00000000-0000-0000-0000-000000000001".into()),
        resource_version: Some("1".into()),
        field_path: None,
    };
    let failed = |note| Occurrence {
        type_: EventType::Warning,
        reason: "RolloutFailed",
        action: "Reconcile",
        note,
    };
    for resource_version in ["1", "2", "3"] {
        let regarding = ObjectReference {
            resource_version: Some(resource_version.into()),
            ..regarding.clone()
        };
        recorder
            .publish(&regarding, &failed("1.1 did not become ready"))
            .await
            .expect("publishing");
    }
    let seen = env.events("RolloutFailed").await;
    let names: Vec<_> = seen.iter().map(|e| &e.metadata.name).collect();
    assert_eq!(seen.len(), 1, "three occurrences, one Event: {names:?}");
    let series = seen[0].series.as_ref().expect("a series");
    assert_eq!(series.count, 3);
    assert_eq!(seen[0].type_.as_deref(), Some("Warning"));
    assert_eq!(
        seen[0].reporting_controller.as_deref(),
        Some("dchat-operator")
    );

    recorder
        .publish(&regarding, &failed("1.2 did not become ready"))
        .await
        .expect("publishing");
    let mut notes: Vec<String> = env
        .events("RolloutFailed")
        .await
        .into_iter()
        .filter_map(|e| e.note)
        .collect();
    notes.sort();
    assert_eq!(
        notes,
        ["1.1 did not become ready", "1.2 did not become ready"],
        "a different note is an Event of its own, with its own note"
    );

    let first = seen[0].metadata.name.clone().expect("a name");
    env.api::<Event>()
        .delete(&first, &DeleteParams::default())
        .await
        .expect("deleting the Event");
    recorder
        .publish(&regarding, &failed("1.1 did not become ready"))
        .await
        .expect("a repeat of a deleted Event makes a new one");
    let again: Vec<Event> = env
        .events("RolloutFailed")
        .await
        .into_iter()
        .filter(|e| e.note.as_deref() == Some("1.1 did not become ready"))
        .collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0].metadata.name.as_deref(), Some(first.as_str()));
    assert!(again[0].series.is_none(), "{:?}", again[0].series);
}
