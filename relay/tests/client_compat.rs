//! The client library against a relay that predates optional features: a scripted
//! relay that announces no `welcome.features`, so the client must not send quiet acks
//! (such a relay would answer them anyway, and the answers would be misread).

use std::time::Duration;

use dchat_relay::client::{generate_key, Client};
use dchat_relay::protocol::{AckRef, Base64Bytes, ClientFrame, KeyHex, Limits, ServerFrame};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Accepts one connection, authenticates it without checking, announces no features,
/// answers every `ack` with `acked` and every `ping` with `pong`, and reports each
/// `ack`'s `quiet` flag on the returned channel.
async fn older_relay() -> (String, mpsc::UnboundedReceiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let send = |f: ServerFrame| Message::Text(serde_json::to_string(&f).unwrap().into());
        ws.send(send(ServerFrame::Challenge {
            v: 1,
            nonce: Base64Bytes(vec![7; 32]),
            expires_in_ms: 30_000,
        }))
        .await
        .unwrap();
        while let Some(Ok(Message::Text(t))) = ws.next().await {
            let answer = match serde_json::from_str::<ClientFrame>(t.as_str()).unwrap() {
                ClientFrame::Auth { key, .. } => ServerFrame::Welcome {
                    key,
                    session: "s".into(),
                    limits: Limits {
                        max_frame_bytes: 65_536,
                        rate_per_sec: 100,
                        burst: 100,
                        max_inflight: 256,
                        idle_timeout_secs: 120,
                    },
                    features: Vec::new(),
                },
                ClientFrame::Ack { messages, quiet } => {
                    acks_tx.send(quiet).unwrap();
                    ServerFrame::Acked {
                        removed: messages.len() as u64,
                    }
                }
                ClientFrame::Ping { nonce } => ServerFrame::Pong { nonce },
                other => panic!("the scripted relay does not expect {other:?}"),
            };
            ws.send(send(answer)).await.unwrap();
        }
    });
    (url, acks_rx)
}

fn refs(n: usize) -> Vec<AckRef> {
    (0..n)
        .map(|i| AckRef {
            from: KeyHex([1; 32]),
            id: format!("m{i}"),
        })
        .collect()
}

#[tokio::test]
async fn without_the_quiet_ack_feature_acks_are_answered_and_awaited() {
    let (url, mut acks) = older_relay().await;
    let mut c = Client::connect(&url, generate_key().unwrap())
        .await
        .unwrap();
    c.set_timeout(Duration::from_secs(5));
    assert!(c.features().is_empty());

    // `ack_quiet` falls back to an ordinary ack and consumes its `acked` answer, so
    // the next request gets its own answer (a left-over `acked` would fail `ping`).
    c.ack_quiet(refs(2)).await.unwrap();
    assert_eq!(acks.recv().await, Some(false));
    c.ping().await.unwrap();
    assert_eq!(c.failed_quiet_acks(), 0);

    // A split writer's deferred acks are not quiet either; their answers reach the
    // reader as `acked` frames.
    let (mut w, mut r) = c.split();
    w.defer_ack(refs(3));
    w.write(&ClientFrame::Ping { nonce: None }).await.unwrap();
    assert_eq!(acks.recv().await, Some(false));
    assert_eq!(
        r.next_frame().await.unwrap(),
        ServerFrame::Acked { removed: 3 }
    );
    assert!(matches!(
        r.next_frame().await.unwrap(),
        ServerFrame::Pong { .. }
    ));
}
