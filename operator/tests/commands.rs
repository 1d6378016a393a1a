//! `dchat-operator promote|abort` set the annotation the rollout acts on.

mod support;

use dchat_operator::commands::{request, CommandError, RolloutCommand};
use support::{Harness, NS};

#[tokio::test]
async fn promote_and_abort_set_their_annotations() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", "version: '1.0.0'").await;
    request(h.client.clone(), NS, "chat", RolloutCommand::Promote)
        .await
        .unwrap();
    request(h.client.clone(), NS, "chat", RolloutCommand::Abort)
        .await
        .unwrap();
    let annotations = h.cluster("chat").await.metadata.annotations.unwrap();
    assert!(annotations.contains_key("dchat.network/promote"));
    assert!(annotations.contains_key("dchat.network/abort"));
}

#[tokio::test]
async fn a_missing_cluster_is_named() {
    let h = Harness::new(false).await;
    let err = request(h.client.clone(), NS, "ghost", RolloutCommand::Promote)
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("apps/ghost"));
}
