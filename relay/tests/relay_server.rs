//! In-process relay tests speaking the real protocol: delivery, dedup, channels,
//! profiles, limits, bad input, TTL, admin API and metrics.

#[path = "support/relay.rs"]
mod relay_support;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::time::Duration;

use dchat_relay::client::{connect_raw, generate_key, public_key, Client, ClientError};
use dchat_relay::protocol::{
    auth_message, AckRef, ClientFrame, ErrorCode, KeyHex, Kind, SendStatus, ServerFrame, SigHex,
};
use ed25519_dalek::Signer;
use futures::{SinkExt, StreamExt};
use relay_support::{http, start};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

type Raw =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut Raw) -> Result<ServerFrame, (u16, String)> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("relay answered")
        {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(Some(f)))) => {
                return Err((u16::from(f.code), f.reason.to_string()))
            }
            Some(Ok(Message::Close(None))) | None => return Err((0, String::new())),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err((0, e.to_string())),
        }
    }
}

/// Reads up to the relay's closing `error` frame (the frames before it are skipped)
/// and the close frame right after it; checks that the two agree (code, reason =
/// message) and returns the error's code and `ref`.
async fn announced_close(ws: &mut Raw) -> (ErrorCode, Option<String>, u16) {
    loop {
        match next_frame(ws).await {
            Ok(ServerFrame::Error {
                code,
                message,
                reference,
                close: Some(close),
                ..
            }) => {
                let (got, reason) = next_frame(ws)
                    .await
                    .expect_err("the close frame follows the closing error frame");
                assert_eq!((got, reason.as_str()), (close, message.as_str()));
                assert_eq!(close, code.close_code(), "{code:?}");
                return (code, reference, close);
            }
            Ok(_) => continue,
            Err(c) => panic!("closed {c:?} without a closing error frame"),
        }
    }
}

/// Sends one text frame.
async fn send_text(ws: &mut Raw, text: &str) {
    ws.send(Message::Text(text.to_string().into()))
        .await
        .unwrap();
}

async fn raw_authed(url: &str) -> (Raw, KeyHex) {
    raw_authed_as(url, &generate_key().unwrap()).await
}

async fn raw_authed_as(url: &str, key: &ed25519_dalek::SigningKey) -> (Raw, KeyHex) {
    let key = key.clone();
    let mut ws = connect_raw(url).await.unwrap();
    let ServerFrame::Challenge { nonce, .. } = next_frame(&mut ws).await.unwrap() else {
        panic!("no challenge")
    };
    let sig = SigHex(key.sign(&auth_message(&nonce.0)).to_bytes());
    let auth = ClientFrame::Auth {
        key: public_key(&key),
        sig,
    };
    ws.send(Message::Text(serde_json::to_string(&auth).unwrap().into()))
        .await
        .unwrap();
    assert!(matches!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Welcome { .. }
    ));
    (ws, public_key(&key))
}

fn error_code(f: ServerFrame) -> ErrorCode {
    match f {
        ServerFrame::Error { code, .. } => code,
        other => panic!("expected error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn live_message_is_pushed_and_acked() {
    let r = start(|_| {}).await;
    let mut a = r.client().await;
    let mut b = r.client().await;
    let sent = a.send_text(b.key(), "hello").await.unwrap();
    assert_eq!(sent.status, SendStatus::Delivered);
    let d = b.next_delivery().await.unwrap();
    assert_eq!(d.envelope.from, Some(a.key()));
    assert_eq!(d.envelope.payload.0, b"hello");
    assert_eq!(d.seq, None, "live pushes carry no store seq");
    assert_eq!(b.ack(vec![d.ack_ref()]).await.unwrap(), 1);
    assert_eq!(
        r.metric("dchat_messages_delivered_total{kind=\"text\"}"),
        1.0
    );
}

/// A live push leaves the relay before the sender's `sent` answer, so the recipient's
/// latency does not include writing the answer. Everything runs on this test's
/// single-threaded runtime: each client's reader records when its frame arrives, and
/// the runtime wakes readers in the order their sockets became readable.
#[tokio::test]
async fn a_live_delivery_is_written_before_the_senders_answer() {
    let r = start(|_| {}).await;
    let a = r.client().await;
    let b = r.client().await;
    let to = b.key();
    let (mut aw, mut ar) = a.split();
    let (_bw, mut br) = b.split();
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for i in 0..20 {
        let seen = arrivals.clone();
        let recipient = tokio::spawn(async move {
            let f = br.next_frame().await.unwrap();
            assert!(matches!(f, ServerFrame::Deliver { .. }), "{f:?}");
            seen.lock().unwrap().push((i, "deliver"));
            br
        });
        let seen = arrivals.clone();
        let sender = tokio::spawn(async move {
            let f = ar.next_frame().await.unwrap();
            assert!(
                matches!(
                    f,
                    ServerFrame::Sent {
                        status: SendStatus::Delivered,
                        ..
                    }
                ),
                "{f:?}"
            );
            seen.lock().unwrap().push((i, "sent"));
            ar
        });
        let env = pipelined_envelope(&mut aw, Some(to), None, i);
        aw.send(env).await.unwrap();
        br = recipient.await.unwrap();
        ar = sender.await.unwrap();
    }
    let arrivals = arrivals.lock().unwrap().clone();
    let want: Vec<_> = (0..20)
        .flat_map(|i| [(i, "deliver"), (i, "sent")])
        .collect();
    assert_eq!(arrivals, want);
}

#[tokio::test]
async fn offline_messages_are_stored_and_delivered_in_order_then_removed_by_ack() {
    let r = start(|_| {}).await;
    let bkey = generate_key().unwrap();
    let bpub = public_key(&bkey);
    let mut a = r.client().await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let s = a.send_text(bpub, &format!("m{i}")).await.unwrap();
        assert_eq!(s.status, SendStatus::Stored);
        seqs.push(s.seq.unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let mut b = r.client_as(&bkey).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(b.next_delivery().await.unwrap());
    }
    let texts: Vec<_> = got
        .iter()
        .map(|d| String::from_utf8(d.envelope.payload.0.clone()).unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(got.iter().map(|d| d.seq.unwrap()).collect::<Vec<_>>(), seqs);
    assert_eq!(
        b.ack(got.iter().map(|d| d.ack_ref()).collect())
            .await
            .unwrap(),
        5
    );
    b.close().await;
    let mut b = r.client_as(&bkey).await;
    let (rest, more) = b.fetch(100).await.unwrap();
    assert!(
        rest.is_empty() && !more,
        "acked messages came back: {rest:?}"
    );
}

#[tokio::test]
async fn same_id_twice_is_never_delivered_twice() {
    let r = start(|_| {}).await;
    let mut a = r.client().await;
    let mut b = r.client().await;
    // Online recipient: second send with the same id is a duplicate.
    let env = a.envelope_to(b.key(), Kind::Text, b"once".to_vec());
    assert_eq!(
        a.send(env.clone()).await.unwrap().status,
        SendStatus::Delivered
    );
    assert_eq!(
        a.send(env.clone()).await.unwrap().status,
        SendStatus::Duplicate
    );
    a.send_text(b.key(), "after").await.unwrap();
    let first = b.next_delivery().await.unwrap();
    let second = b.next_delivery().await.unwrap();
    assert_eq!(first.envelope.id, env.id);
    assert_eq!(second.envelope.payload.0, b"after");
    // Offline recipient: the store deduplicates too.
    let offline = public_key(&generate_key().unwrap());
    let env = a.envelope_to(offline, Kind::Text, b"x".to_vec());
    assert_eq!(
        a.send(env.clone()).await.unwrap().status,
        SendStatus::Stored
    );
    assert_eq!(a.send(env).await.unwrap().status, SendStatus::Duplicate);
    assert_eq!(r.metric("dchat_messages_duplicate_total"), 2.0);
}

#[tokio::test]
async fn unacked_live_message_is_redelivered_after_reconnect() {
    let r = start(|_| {}).await;
    let bkey = generate_key().unwrap();
    let mut a = r.client().await;
    let mut b = r.client_as(&bkey).await;
    assert_eq!(
        a.send_text(b.key(), "keep me").await.unwrap().status,
        SendStatus::Delivered
    );
    let d = b.next_delivery().await.unwrap();
    assert_eq!(d.envelope.payload.0, b"keep me");
    b.close().await; // no ack
                     // The relay stores it when the session ends; wait for that by reconnecting
                     // until it is delivered from storage.
    let mut b = r.client_as(&bkey).await;
    let (ds, _) = b.fetch(10).await.unwrap();
    let again = if ds.is_empty() {
        b.next_delivery().await.unwrap()
    } else {
        ds[0].clone()
    };
    assert_eq!(again.envelope.id, d.envelope.id);
    assert!(again.seq.is_some(), "redelivery comes from storage");
    assert_eq!(b.ack(vec![again.ack_ref()]).await.unwrap(), 1);
}

#[tokio::test]
async fn channel_fanout_reaches_live_and_offline_members() {
    let r = start(|_| {}).await;
    let ckey = generate_key().unwrap();
    let mut a = r.client().await;
    let mut b = r.client().await;
    let mut c = r.client_as(&ckey).await;
    for cl in [&mut a, &mut b, &mut c] {
        cl.join("room-1").await.unwrap();
    }
    c.close().await;
    // Closing is asynchronous on the relay; make sure C's session is gone by
    // waiting for the session gauge to drop.
    for _ in 0..200 {
        if r.metric("dchat_sessions ") == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let env = a.envelope_channel("room-1", Kind::Sticker, b"hi all".to_vec());
    let s = a.send(env.clone()).await.unwrap();
    assert_eq!(s.status, SendStatus::Fanout);
    assert_eq!((s.delivered, s.stored), (Some(1), Some(1)));
    let d = b.next_delivery().await.unwrap();
    assert_eq!(d.envelope.channel.as_deref(), Some("room-1"));
    assert_eq!(d.envelope.kind, Kind::Sticker);
    let mut c = r.client_as(&ckey).await;
    let d = c.next_delivery().await.unwrap();
    assert_eq!(d.envelope.id, env.id);
    // A non-member cannot post.
    let mut outsider = r.client().await;
    let env = outsider.envelope_channel("room-1", Kind::Text, b"spam".to_vec());
    match outsider.send(env).await {
        Err(ClientError::Relay { code, .. }) => assert_eq!(code, ErrorCode::NotMember),
        other => panic!("{other:?}"),
    }
    // After leaving, B no longer receives.
    b.leave("room-1").await.unwrap();
    let env = a.envelope_channel("room-1", Kind::Text, b"2".to_vec());
    let s = a.send(env).await.unwrap();
    assert_eq!((s.delivered, s.stored), (Some(1), Some(0)));
}

#[tokio::test]
async fn profiles_are_signed_published_and_fetched() {
    let r = start(|_| {}).await;
    let mut a = r.client().await;
    let mut b = r.client().await;
    assert!(a.publish_profile("Alice", None, 10).await.unwrap());
    assert!(!a.publish_profile("Old Alice", None, 5).await.unwrap());
    let p = b.get_profile(a.key()).await.unwrap().unwrap();
    assert_eq!(p.doc.name, "Alice");
    assert_eq!(p.doc.key, a.key());
    assert!(b.get_profile(b.key()).await.unwrap().is_none());
    // A profile signed by someone else is refused.
    let (mut raw, me) = raw_authed(&r.url()).await;
    let other = generate_key().unwrap();
    let doc =
        serde_json::to_vec(&serde_json::json!({"key": me, "name": "x", "updated_ms": 1})).unwrap();
    let sig = SigHex(
        other
            .sign(&dchat_relay::protocol::profile_message(&doc))
            .to_bytes(),
    );
    let f = ClientFrame::ProfilePublish {
        data: dchat_relay::protocol::Base64Bytes(doc),
        sig,
    };
    raw.send(Message::Text(serde_json::to_string(&f).unwrap().into()))
        .await
        .unwrap();
    assert_eq!(
        error_code(next_frame(&mut raw).await.unwrap()),
        ErrorCode::InvalidProfile
    );
}

#[tokio::test]
async fn bad_signature_fails_auth_and_closes() {
    let r = start(|_| {}).await;
    let key = generate_key().unwrap();
    let mut ws = connect_raw(&r.url()).await.unwrap();
    let ServerFrame::Challenge { nonce, .. } = next_frame(&mut ws).await.unwrap() else {
        panic!()
    };
    // Sign a different nonce: as if replaying a signature from another connection.
    let mut other = nonce.0.clone();
    other[0] ^= 1;
    let sig = SigHex(key.sign(&auth_message(&other)).to_bytes());
    let auth = ClientFrame::Auth {
        key: public_key(&key),
        sig,
    };
    ws.send(Message::Text(serde_json::to_string(&auth).unwrap().into()))
        .await
        .unwrap();
    // The error answers the `auth` and announces the close.
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::AuthFailed, Some("auth".into()), 4001)
    );
    assert_eq!(
        r.metric("dchat_auth_failures_total{reason=\"bad_signature\"}"),
        1.0
    );
}

#[tokio::test]
async fn requests_before_auth_are_refused_and_challenge_expires() {
    // Long enough that the error frame below always arrives before the expiry close,
    // even on a loaded CI machine.
    let r = start(|c| c.auth_timeout = Duration::from_secs(2)).await;
    let mut ws = connect_raw(&r.url()).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Challenge { .. }
    ));
    ws.send(Message::Text(r#"{"type":"join","channel":"x"}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        error_code(next_frame(&mut ws).await.unwrap()),
        ErrorCode::NotAuthenticated
    );
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::ChallengeExpired, None, 4002)
    );
}

#[tokio::test]
async fn malformed_unknown_and_binary_frames_get_typed_errors_and_connection_survives() {
    let r = start(|_| {}).await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(
        error_code(next_frame(&mut ws).await.unwrap()),
        ErrorCode::BadFrame
    );
    ws.send(Message::Text(r#"{"type":"teleport"}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        error_code(next_frame(&mut ws).await.unwrap()),
        ErrorCode::UnknownType
    );
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        error_code(next_frame(&mut ws).await.unwrap()),
        ErrorCode::BinaryFrame
    );
    ws.send(Message::Text(
        r#"{"type":"send","envelope":{"id":"","to":"00","ts":1,"kind":"text","payload":""}}"#
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(
        error_code(next_frame(&mut ws).await.unwrap()),
        ErrorCode::BadFrame
    );
    ws.send(Message::Text(r#"{"type":"ping","nonce":"n"}"#.into()))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Pong {
            nonce: Some("n".into())
        }
    );
    assert_eq!(
        r.metric("dchat_rejected_frames_total{code=\"bad_frame\"}"),
        2.0
    );
    assert_eq!(
        r.metric("dchat_rejected_frames_total{code=\"unknown_type\"}"),
        1.0
    );
}

#[tokio::test]
async fn oversized_frame_and_invalid_utf8_close_with_reason() {
    let r = start(|c| c.max_message_bytes = 4096).await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    ws.send(Message::Text("x".repeat(10_000).into()))
        .await
        .unwrap();
    // The WebSocket layer refuses these, and the relay can still write: each close is
    // announced by an error frame, as every other.
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::FrameTooLarge, None, 1009)
    );

    let (mut ws, _) = raw_authed(&r.url()).await;
    let bad = Frame::message(vec![0xff, 0xfe, 0x80], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await.unwrap();
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::InvalidUtf8, None, 1007)
    );

    // Other connections are unaffected.
    let mut c = r.client().await;
    c.ping().await.unwrap();
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"frame_too_large\"}"),
        1.0
    );
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"invalid_utf8\"}"),
        1.0
    );
}

#[tokio::test]
async fn flood_is_rate_limited_then_disconnected_without_touching_others() {
    let r = start(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 5;
    })
    .await;
    let mut bystander = r.client().await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    for _ in 0..200 {
        if ws
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut pongs = 0;
    let mut limited = 0;
    let close = loop {
        match next_frame(&mut ws).await {
            Ok(ServerFrame::Pong { .. }) => pongs += 1,
            Ok(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            }) => limited += 1,
            Ok(other) => panic!("{other:?}"),
            Err(c) => break c,
        }
    };
    assert_eq!(close.0, 4008, "{close:?}");
    // Burst 5 plus 1/s refill while the 200 frames are processed: far below 200.
    assert!(pongs <= 20, "rate limit not applied: {pongs} pongs");
    assert!(limited >= 1);
    bystander.ping().await.unwrap();
}

/// The 64th frame in a row refused by the rate limit is answered by the closing
/// `rate_limited` error (with `close: 4008`), not by an ordinary error: every frame
/// before the close gets exactly one answer, and the run of refusals that ends the
/// connection is exactly 64 long.
#[tokio::test]
async fn the_64th_refused_frame_in_a_row_is_answered_by_the_closing_error() {
    let r = start(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 1;
    })
    .await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    // Far more than 64: a token refilled meanwhile answers a ping and starts a new run.
    for _ in 0..400 {
        if ws
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut refused_in_a_row = 0;
    let mut refused = 0;
    loop {
        match next_frame(&mut ws).await.expect("announced close") {
            ServerFrame::Pong { .. } => refused_in_a_row = 0,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                reference,
                close: None,
                ..
            } => {
                assert_eq!(reference.as_deref(), Some("ping"));
                refused_in_a_row += 1;
                refused += 1;
            }
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                reference,
                close: Some(4008),
                message,
                ..
            } => {
                assert_eq!(
                    reference.as_deref(),
                    Some("ping"),
                    "it answers the 64th ping"
                );
                refused_in_a_row += 1;
                refused += 1;
                assert_eq!(
                    next_frame(&mut ws).await.unwrap_err(),
                    (4008, message),
                    "the close frame follows at once"
                );
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(refused_in_a_row, 64);
    // Every refused frame counts, the one answered by the closing error too.
    assert_eq!(
        r.metric("dchat_rejected_frames_total{code=\"rate_limited\"}"),
        f64::from(refused)
    );
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"rate_limited\"}"),
        1.0
    );
}

/// Fragmented WebSocket messages (RFC 6455 §5.4) are accepted, with control frames
/// between the fragments; the size limit applies to the whole message (its text
/// bytes), not to each fragment: a message of exactly the limit passes, one byte more
/// closes with `frame_too_large` although every fragment is small.
#[tokio::test]
async fn fragmented_messages_are_accepted_and_the_limit_applies_to_the_whole_message() {
    const LIMIT: usize = 4096;
    let r = start(|c| c.max_message_bytes = LIMIT).await;

    async fn send_fragmented(ws: &mut Raw, text: &str, fragment: usize) {
        let parts: Vec<&[u8]> = text.as_bytes().chunks(fragment).collect();
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            let opcode = if i == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            let frame = Frame::message(part.to_vec(), opcode, i == last);
            if ws.send(Message::Frame(frame)).await.is_err() {
                return;
            }
            if i == 0 {
                // A control frame may come between the fragments of a message.
                ws.send(Message::Ping(b"between".to_vec().into()))
                    .await
                    .unwrap();
            }
        }
    }
    // `{"type":"ping","nonce":"…"}` is 26 bytes plus the nonce.
    let ping_of = |len: usize| {
        let nonce = "n".repeat(len - 26);
        (format!(r#"{{"type":"ping","nonce":"{nonce}"}}"#), nonce)
    };

    let (mut ws, _) = raw_authed(&r.url()).await;
    let (small, nonce) = ping_of(40);
    send_fragmented(&mut ws, &small, 7).await;
    assert_eq!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Pong { nonce: Some(nonce) }
    );
    let (exact, nonce) = ping_of(LIMIT);
    assert_eq!(exact.len(), LIMIT);
    send_fragmented(&mut ws, &exact, 1000).await;
    assert_eq!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Pong { nonce: Some(nonce) }
    );

    let (over, _) = ping_of(LIMIT + 1);
    send_fragmented(&mut ws, &over, 1000).await;
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::FrameTooLarge, None, 1009)
    );
}

/// A WebSocket-level protocol violation (here a reserved bit set without an extension)
/// ends the connection with `bad_frame` and close code 4000, announced like every close.
#[tokio::test]
async fn a_websocket_protocol_violation_closes_with_4000() {
    let r = start(|_| {}).await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    let mut frame = Frame::message(
        br#"{"type":"ping"}"#.to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    frame.header_mut().rsv1 = true;
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::BadFrame, None, 4000)
    );
}

/// Before authentication a frame is decoded first: what does not decode is `bad_frame`
/// (or `unknown_type`) as it is after authentication, and only a well-formed frame
/// other than `auth` and `ping` is `not_authenticated` (its values are not checked).
/// A malformed `auth` is `bad_frame` and does not use up the challenge.
#[tokio::test]
async fn before_auth_decoding_comes_first_and_a_malformed_auth_keeps_the_challenge() {
    let r = start(|_| {}).await;
    let key = generate_key().unwrap();
    let mut ws = connect_raw(&r.url()).await.unwrap();
    let ServerFrame::Challenge { nonce, .. } = next_frame(&mut ws).await.unwrap() else {
        panic!("no challenge")
    };
    let cases: [(&str, ErrorCode, Option<&str>, bool); 7] = [
        ("{not json", ErrorCode::BadFrame, None, false),
        (
            r#"{"type":"join"}"#,
            ErrorCode::BadFrame,
            Some("join"),
            false,
        ),
        (
            r#"{"type":"teleport"}"#,
            ErrorCode::UnknownType,
            None,
            false,
        ),
        (
            r#"{"type":"join","channel":"not a name"}"#,
            ErrorCode::NotAuthenticated,
            Some("join"),
            false,
        ),
        (
            r#"{"type":"ack","messages":[],"quiet":true}"#,
            ErrorCode::NotAuthenticated,
            Some("ack"),
            true,
        ),
        (
            r#"{"type":"auth","key":"zz","sig":"00"}"#,
            ErrorCode::BadFrame,
            Some("auth"),
            false,
        ),
        (
            r#"{"type":"auth"}"#,
            ErrorCode::BadFrame,
            Some("auth"),
            false,
        ),
    ];
    for (text, want, want_ref, want_quiet) in cases {
        send_text(&mut ws, text).await;
        match next_frame(&mut ws).await.unwrap() {
            ServerFrame::Error {
                code,
                reference,
                quiet,
                close: None,
                ..
            } => assert_eq!(
                (code, reference.as_deref(), quiet),
                (want, want_ref, want_quiet),
                "{text}"
            ),
            other => panic!("{text}: {other:?}"),
        }
    }
    // The challenge was not used: a valid auth on the same connection succeeds.
    let auth = ClientFrame::Auth {
        key: public_key(&key),
        sig: SigHex(key.sign(&auth_message(&nonce.0)).to_bytes()),
    };
    send_text(&mut ws, &serde_json::to_string(&auth).unwrap()).await;
    assert!(matches!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Welcome { .. }
    ));
}

/// Errors about a quiet ack — malformed, too many references — are marked
/// `quiet: true` (with `ref` "ack"), so a client counting answers never takes one for
/// the answer to another request, not even to an ordinary `ack` waiting behind it.
/// Only the JSON literal `true` makes an ack quiet.
#[tokio::test]
async fn errors_about_quiet_acks_are_marked_quiet_and_never_taken_for_other_answers() {
    let r = start(|_| {}).await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    for (text, want_quiet) in [
        (r#"{"type":"ack","messages":"x","quiet":true}"#, true),
        (
            r#"{"quiet":true,"type":"ack","messages":[{"from":"zz","id":"m"}]}"#,
            true,
        ),
        (r#"{"type":"ack","messages":"x"}"#, false),
        (r#"{"type":"ack","messages":[],"quiet":"yes"}"#, false),
        (
            r#"{"type":"ack","messages":[],"quiet":false,"extra":1}"#,
            false,
        ),
    ] {
        send_text(&mut ws, text).await;
        match next_frame(&mut ws).await.unwrap() {
            ServerFrame::Error {
                code,
                reference,
                quiet,
                close: None,
                ..
            } => assert_eq!(
                (code, reference.as_deref(), quiet),
                (ErrorCode::BadFrame, Some("ack"), want_quiet),
                "{text}"
            ),
            other => panic!("{text}: {other:?}"),
        }
    }
    send_text(&mut ws, r#"{"type":"ping","nonce":"after"}"#).await;
    assert_eq!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Pong {
            nonce: Some("after".into())
        }
    );

    // Through the client library: a refused quiet ack, then an ordinary ack. The
    // error is counted as the quiet ack's failure and the `acked` answers the ack.
    let mut b = r.client().await;
    let me = b.key();
    let refused = ClientFrame::Ack {
        messages: vec![
            AckRef {
                from: me,
                id: "x".into()
            };
            dchat_relay::protocol::MAX_ACK_BATCH + 1
        ],
        quiet: true,
    };
    b.write(&refused).await.unwrap();
    let unknown = AckRef {
        from: me,
        id: "never-sent".into(),
    };
    assert_eq!(b.ack(vec![unknown]).await.unwrap(), 0, "nothing to remove");
    assert_eq!(b.failed_quiet_acks(), 1);
}

/// What `acked.removed` counts: each reference that matched a message for this key
/// that was still there — in flight on this connection (live pushes are removed from
/// memory) or stored, delivered yet or not. Unknown, already acknowledged and repeated
/// references count 0 and are not errors.
#[tokio::test]
async fn acked_counts_the_messages_that_were_still_there() {
    let r = start(|c| c.max_inflight = 1).await;
    let mut a = r.client().await;
    let mut b = r.client().await;
    a.send_text(b.key(), "live").await.unwrap();
    let live = b.next_delivery().await.unwrap();
    assert_eq!(live.seq, None);
    // The live message twice in one ack: the first reference removes it.
    assert_eq!(
        b.ack(vec![live.ack_ref(), live.ack_ref()]).await.unwrap(),
        1
    );
    assert_eq!(
        b.ack(vec![live.ack_ref()]).await.unwrap(),
        0,
        "already acknowledged"
    );
    let unknown = AckRef {
        from: a.key(),
        id: "unknown".into(),
    };
    assert_eq!(b.ack(vec![unknown]).await.unwrap(), 0);

    // Two stored messages, an in-flight window of one: the second is acknowledged
    // before it was delivered, by its sender and id.
    let ckey = generate_key().unwrap();
    let cpub = public_key(&ckey);
    let mut ids = Vec::new();
    for text in ["first", "second"] {
        let env = a.envelope_to(cpub, Kind::Text, text.as_bytes().to_vec());
        ids.push(env.id.clone());
        assert_eq!(a.send(env).await.unwrap().status, SendStatus::Stored);
    }
    let mut c = r.client_as(&ckey).await;
    let first = c.next_delivery().await.unwrap();
    assert_eq!(first.envelope.id, ids[0]);
    let second = AckRef {
        from: a.key(),
        id: ids[1].clone(),
    };
    assert_eq!(c.ack(vec![second]).await.unwrap(), 1);
    assert_eq!(c.ack(vec![first.ack_ref()]).await.unwrap(), 1);
    let (rest, more) = c.fetch(10).await.unwrap();
    assert!(rest.is_empty() && !more, "{rest:?}");
}

/// The rows of the table in `docs/protocol.md` ("`bad_frame` or `invalid_envelope`"),
/// sent to a relay: each frame gets exactly one answer, the code and `ref` of the table.
#[tokio::test]
async fn bad_frame_and_invalid_envelope_table() {
    let r = start(|_| {}).await;
    let key = generate_key().unwrap();
    let (mut ws, _) = raw_authed_as(&r.url(), &key).await;
    let to = "ab".repeat(32);
    let send = |extra: &str| {
        format!(
            r#"{{"type":"send","envelope":{{"id":"m1","to":"{to}","ts":1,"kind":"text","payload":"aGk="{extra}}}}}"#
        )
    };
    let media = |m: &str| send(&format!(r#","media":{{{m}}}"#));
    let ok_media = format!(r#""url":"https://m/x","sha256":"{to}","size":1,"mime":"image/png""#);
    use ErrorCode::{BadFrame, InvalidEnvelope, InvalidProfile};
    // A signed profile document that is not JSON: decoded fine, refused on its content.
    let doc = b"not a profile".to_vec();
    let doc_sig = SigHex(
        key.sign(&dchat_relay::protocol::profile_message(&doc))
            .to_bytes(),
    );
    let signed_garbage = serde_json::to_string(&ClientFrame::ProfilePublish {
        data: dchat_relay::protocol::Base64Bytes(doc),
        sig: doc_sig,
    })
    .unwrap();
    let rows: Vec<(&str, String, ErrorCode, Option<&str>)> = vec![
        (
            "bad hex in a key",
            send("").replace(&to, &"zz".repeat(32)),
            BadFrame,
            Some("send"),
        ),
        (
            "bad base64",
            send("").replace("aGk=", "!!!!"),
            BadFrame,
            Some("send"),
        ),
        (
            "unpadded base64",
            send("").replace("aGk=", "aGk"),
            BadFrame,
            Some("send"),
        ),
        (
            "float ts",
            send("").replace(r#""ts":1"#, r#""ts":1.0"#),
            BadFrame,
            Some("send"),
        ),
        (
            "unknown kind",
            send("").replace(r#""text""#, r#""gif""#),
            BadFrame,
            Some("send"),
        ),
        (
            "negative media.size",
            media(&ok_media.replace(r#""size":1"#, r#""size":-1"#)),
            BadFrame,
            Some("send"),
        ),
        (
            "media.sha256 not hex",
            media(&ok_media.replace(&to, &"zz".repeat(32))),
            InvalidEnvelope,
            Some("m1"),
        ),
        (
            "both to and channel",
            send(r#","channel":"c""#),
            InvalidEnvelope,
            Some("m1"),
        ),
        (
            "bad channel name in join",
            r#"{"type":"join","channel":"a b"}"#.into(),
            InvalidEnvelope,
            Some("a b"),
        ),
        (
            "invalid base64 in profile_publish",
            format!(
                r#"{{"type":"profile_publish","data":"a","sig":"{}"}}"#,
                "00".repeat(64)
            ),
            BadFrame,
            Some("profile_publish"),
        ),
        (
            "signed profile document that is not JSON",
            signed_garbage,
            InvalidProfile,
            Some("profile_publish"),
        ),
        ("not JSON", "{".into(), BadFrame, None),
        (
            "unknown type",
            r#"{"type":"teleport"}"#.into(),
            ErrorCode::UnknownType,
            None,
        ),
    ];
    for (what, text, want, want_ref) in rows {
        send_text(&mut ws, &text).await;
        match next_frame(&mut ws).await.unwrap() {
            ServerFrame::Error {
                code,
                reference,
                quiet: false,
                close: None,
                ..
            } => assert_eq!((code, reference.as_deref()), (want, want_ref), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    send_text(&mut ws, &send("")).await;
    assert!(matches!(
        next_frame(&mut ws).await.unwrap(),
        ServerFrame::Sent { .. }
    ));
}

/// A client that drops its TCP connection without a close frame is simply gone: the
/// relay counts no close of its own (it used to count a `bad_frame` close).
#[tokio::test]
async fn a_dropped_connection_is_not_counted_as_a_close_by_the_relay() {
    let r = start(|_| {}).await;
    let (ws, _) = raw_authed(&r.url()).await;
    assert_eq!(r.metric("dchat_sessions "), 1.0);
    drop(ws);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.metric("dchat_sessions ") > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"bad_frame\"}"),
        0.0
    );
}

#[tokio::test]
async fn idle_connection_is_closed() {
    let r = start(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    assert_eq!(
        announced_close(&mut ws).await,
        (ErrorCode::IdleTimeout, None, 4004)
    );
    // A close that refuses no frame counts as a close, not as a rejected frame.
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"idle_timeout\"}"),
        1.0
    );
    assert_eq!(
        r.metric("dchat_rejected_frames_total{code=\"idle_timeout\"}"),
        0.0
    );
}

#[tokio::test]
async fn slow_reader_backpressure_goes_to_storage_and_order_is_kept() {
    let r = start(|c| {
        c.outbound_queue = 4;
        c.max_inflight = 8;
    })
    .await;
    let bkey = generate_key().unwrap();
    let mut a = r.client().await;
    let b = r.client_as(&bkey).await;
    let mut statuses = Vec::new();
    for i in 0..40 {
        statuses.push(a.send_text(b.key(), &i.to_string()).await.unwrap().status);
    }
    assert!(statuses.contains(&SendStatus::Stored), "{statuses:?}");
    // B now reads everything (acking as it goes) and gets all 40 in order, once.
    let mut b = b;
    let mut got = Vec::new();
    while got.len() < 40 {
        let d = b.next_delivery().await.unwrap();
        got.push(String::from_utf8(d.envelope.payload.0.clone()).unwrap());
        b.ack(vec![d.ack_ref()]).await.unwrap();
    }
    let want: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
}

// ---- backpressure: a full recipient queue makes the sender wait, not store ----

/// A text envelope from the writer's client to a key or a channel.
fn pipelined_envelope(
    w: &mut dchat_relay::client::ClientWriter,
    to: Option<KeyHex>,
    channel: Option<&str>,
    i: i64,
) -> dchat_relay::protocol::Envelope {
    dchat_relay::protocol::Envelope {
        id: w.fresh_id(),
        from: None,
        to,
        channel: channel.map(str::to_string),
        ts: i,
        kind: Kind::Text,
        payload: dchat_relay::protocol::Base64Bytes(i.to_le_bytes().to_vec()),
        media: None,
    }
}

/// Writes `n` text messages to a key or a channel without waiting for answers; returns
/// their ids in order.
async fn send_burst(
    w: &mut dchat_relay::client::ClientWriter,
    to: Option<KeyHex>,
    channel: Option<&str>,
    n: i64,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let env = pipelined_envelope(w, to, channel, i);
        ids.push(env.id.clone());
        w.send(env).await.unwrap();
    }
    ids
}

/// Every message went out live: no push wait ran out and no copy was stored.
fn assert_nothing_stored(r: &relay_support::TestRelay) {
    assert_eq!(r.metric("dchat_push_wait_timeouts_total"), 0.0);
    assert_eq!(r.metric("dchat_messages_stored_total{kind=\"text\"}"), 0.0);
}

/// Reads the `sent` answers of `ids` in order and returns their frames.
async fn sent_answers(
    rd: &mut dchat_relay::client::ClientReader,
    ids: &[String],
) -> Vec<ServerFrame> {
    let mut answers = Vec::new();
    for id in ids {
        let f = rd.next_frame().await.unwrap();
        match &f {
            ServerFrame::Sent { id: got, .. } => assert_eq!(got, id),
            other => panic!("{other:?}"),
        }
        answers.push(f);
    }
    answers
}

/// Push queues of one message and a push wait far longer than any test: a wait that
/// runs out shows up as a push wait timeout, not as a slow test.
fn one_slot_queues(c: &mut dchat_relay::config::Config) {
    c.outbound_queue = 1;
    c.push_wait = Duration::from_secs(10);
}

fn status(f: &ServerFrame) -> SendStatus {
    match f {
        ServerFrame::Sent { status, .. } => *status,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_full_queue_makes_the_sender_wait_and_the_message_is_pushed_live() {
    // A one-slot queue fills at once under a pipelined burst (the recipient's task
    // cannot run between two sends of the burst on this single-threaded runtime).
    let r = start(one_slot_queues).await;
    let mut b = r.client().await;
    let (mut w, mut rd) = r.client().await.split();
    let ids = send_burst(&mut w, Some(b.key()), None, 100).await;
    for f in sent_answers(&mut rd, &ids).await {
        assert_eq!(status(&f), SendStatus::Delivered, "{f:?}");
    }
    for id in &ids {
        assert_eq!(&b.next_delivery().await.unwrap().envelope.id, id);
    }
    assert!(
        r.metric("dchat_push_waits_total") >= 1.0,
        "the burst never found the queue full"
    );
    assert_nothing_stored(&r);
}

#[tokio::test]
async fn a_queue_still_full_after_the_push_wait_falls_back_to_storage_in_order() {
    // With one delivery in flight the recipient's session takes nothing more off its
    // one-slot queue until that is acknowledged, so the queue stays full for the burst
    // however the runtime interleaves the two sessions.
    let r = start(|c| {
        c.outbound_queue = 1;
        c.max_inflight = 1;
        c.push_wait = Duration::ZERO;
    })
    .await;
    let mut b = r.client().await;
    let (mut w, mut rd) = r.client().await.split();
    let ids = send_burst(&mut w, Some(b.key()), None, 100).await;
    let statuses: Vec<_> = sent_answers(&mut rd, &ids)
        .await
        .iter()
        .map(status)
        .collect();
    assert!(statuses.contains(&SendStatus::Stored), "{statuses:?}");
    assert!(r.metric("dchat_push_wait_timeouts_total") >= 1.0);
    // Live and stored copies arrive in the order they were sent, each once.
    for id in &ids {
        let d = b.next_delivery().await.unwrap();
        assert_eq!(&d.envelope.id, id);
        b.ack(vec![d.ack_ref()]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_waiting_on_each_others_full_queue_do_not_deadlock() {
    // Each session waits for room in the other's one-slot queue. A waiting session
    // keeps writing its own queue to its client, so both make progress; were they to
    // wait on each other, every wait would run into the 10 s push wait and store.
    let r = start(one_slot_queues).await;
    let a = r.client().await;
    let b = r.client().await;
    let (ka, kb) = (a.key(), b.key());
    let (mut wa, ra) = a.split();
    let (mut wb, rb) = b.split();
    // Below the in-flight window (256): nobody acknowledges here.
    let n = 200;
    let mut ids = (Vec::new(), Vec::new());
    for i in 0..n {
        let env = pipelined_envelope(&mut wa, Some(kb), None, i);
        ids.0.push(env.id.clone());
        wa.send(env).await.unwrap();
        let env = pipelined_envelope(&mut wb, Some(ka), None, i);
        ids.1.push(env.id.clone());
        wb.send(env).await.unwrap();
    }
    // Both readers run at once: each client reads its answers and its deliveries.
    let read = |mut rd: dchat_relay::client::ClientReader,
                mine: Vec<String>,
                theirs: Vec<String>| async move {
        let (mut sent, mut delivered) = (0, 0);
        while sent < mine.len() || delivered < theirs.len() {
            match rd.next_frame().await.unwrap() {
                ServerFrame::Sent { id, status, .. } => {
                    assert_eq!(id, mine[sent]);
                    assert_eq!(status, SendStatus::Delivered);
                    sent += 1;
                }
                ServerFrame::Deliver { envelope, .. } => {
                    assert_eq!(envelope.id, theirs[delivered]);
                    delivered += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    };
    let ta = tokio::spawn(read(ra, ids.0.clone(), ids.1.clone()));
    let tb = tokio::spawn(read(rb, ids.1, ids.0));
    ta.await.unwrap();
    tb.await.unwrap();
    assert_nothing_stored(&r);
}

#[tokio::test]
async fn quiet_acks_behind_a_waiting_send_are_applied_while_it_waits() {
    // A's send waits for room in B's queue; A's quiet ack, written after that send,
    // must not wait behind it: it frees A's own window, and a client whose acks sit
    // behind waiting sends would stall every session that waits on it in turn.
    let r = start(|c| {
        c.outbound_queue = 1;
        c.push_wait = Duration::from_secs(10);
        c.write_timeout = Duration::from_secs(60);
        c.max_message_bytes = 1 << 20;
    })
    .await;
    let mut sender = r.client().await;
    let (mut wa, mut ra) = r.client().await.split();
    // A holds one unacknowledged delivery.
    sender.send_text(wa.key(), "for a").await.unwrap();
    let for_a = match ra.next_frame().await.unwrap() {
        ServerFrame::Deliver { envelope, .. } => AckRef {
            from: envelope.from.unwrap(),
            id: envelope.id,
        },
        other => panic!("{other:?}"),
    };
    // B never reads its socket: once the socket buffers are full, B's session is stuck
    // writing and its one-slot queue stays full. A filler sends large messages to B
    // from its own task (it ends up waiting too, and its writes block).
    let (_b_ws, b) = raw_authed(&r.url()).await;
    let (mut wf, _rf) = r.client().await.split();
    let filler = tokio::spawn(async move {
        for i in 0..24 {
            let mut env = pipelined_envelope(&mut wf, Some(b), None, i);
            env.kind = Kind::File;
            env.payload = dchat_relay::protocol::Base64Bytes(vec![7u8; 700 * 1024]);
            if wf.send(env).await.is_err() {
                break;
            }
        }
        wf
    });
    assert!(
        r.metric_reaches("dchat_push_waits_total", 1.0, Duration::from_secs(10))
            .await,
        "B's queue never filled"
    );
    // A's send finds B's queue full and waits; A's quiet ack follows it.
    let env = pipelined_envelope(&mut wa, Some(b), None, 1);
    wa.send(env).await.unwrap();
    wa.write(&ClientFrame::Ack {
        messages: vec![for_a],
        quiet: true,
    })
    .await
    .unwrap();
    assert!(
        r.metric_reaches("dchat_messages_acked_total", 1.0, Duration::from_secs(5))
            .await,
        "the quiet ack waited behind the send"
    );
    assert!(
        r.metric("dchat_push_waits_total") >= 2.0,
        "A's send did not wait"
    );
    assert_eq!(r.metric("dchat_push_wait_timeouts_total"), 0.0);
    filler.abort();
}

#[tokio::test]
async fn a_channel_burst_waits_for_every_members_queue() {
    let r = start(one_slot_queues).await;
    let mut members = Vec::new();
    for _ in 0..4 {
        let mut m = r.client().await;
        m.join("busy").await.unwrap();
        members.push(m);
    }
    let mut a = r.client().await;
    a.join("busy").await.unwrap();
    let (mut w, mut rd) = a.split();
    let ids = send_burst(&mut w, None, Some("busy"), 50).await;
    for f in sent_answers(&mut rd, &ids).await {
        match f {
            ServerFrame::Sent {
                status,
                delivered,
                stored,
                ..
            } => {
                assert_eq!(status, SendStatus::Fanout);
                assert_eq!((delivered, stored), (Some(4), Some(0)));
            }
            other => panic!("{other:?}"),
        }
    }
    for m in &mut members {
        for id in &ids {
            assert_eq!(&m.next_delivery().await.unwrap().envelope.id, id);
        }
    }
    assert!(r.metric("dchat_push_waits_total") >= 1.0);
    assert_eq!(r.metric("dchat_push_wait_timeouts_total"), 0.0);
}

#[tokio::test]
async fn reader_that_stops_reading_is_disconnected() {
    let r = start(|c| {
        c.write_timeout = Duration::from_millis(300);
        c.max_message_bytes = 1 << 20;
        c.rate_per_sec = 10_000;
        c.rate_burst = 10_000;
    })
    .await;
    let mut a = r.client().await;
    // B authenticates but never reads its socket again.
    let (_b_ws, b) = raw_authed(&r.url()).await;
    let payload = vec![7u8; 512 * 1024];
    for _ in 0..200 {
        let env = a.envelope_to(b, Kind::File, payload.clone());
        a.send(env).await.unwrap();
        if r.metric("dchat_connections_closed_total{code=\"slow_consumer\"}") >= 1.0 {
            break;
        }
    }
    for _ in 0..300 {
        if r.metric("dchat_connections_closed_total{code=\"slow_consumer\"}") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"slow_consumer\"}"),
        1.0
    );
    a.ping().await.unwrap();
}

#[tokio::test]
async fn expired_messages_are_not_delivered_and_are_removed() {
    let r = start(|c| c.message_ttl = Duration::from_secs(1)).await;
    let bkey = generate_key().unwrap();
    let mut a = r.client().await;
    assert_eq!(
        a.send_text(public_key(&bkey), "soon gone")
            .await
            .unwrap()
            .status,
        SendStatus::Stored
    );
    for _ in 0..500 {
        if r.metric("dchat_messages_expired_total") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(r.metric("dchat_messages_expired_total"), 1.0);
    let mut b = r.client_as(&bkey).await;
    let (ds, more) = b.fetch(10).await.unwrap();
    assert!(ds.is_empty() && !more);
}

#[tokio::test]
async fn health_ready_and_metrics_endpoints() {
    let r = start(|_| {}).await;
    let h = http(r.relay.addr, "GET", "/health", None, b"").await;
    assert_eq!(h.status, 200);
    let h = http(r.relay.addr, "GET", "/ready", None, b"").await;
    assert_eq!(h.status, 200, "{}", h.text());
    let _c = r.client().await;
    let m = http(r.relay.metrics_addr, "GET", "/metrics", None, b"").await;
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "dchat_connections ",
        "dchat_auth_failures",
        "dchat_messages_routed_total",
        "dchat_messages_stored_total",
        "dchat_messages_delivered_total",
        "dchat_messages_expired_total",
        "dchat_delivery_latency_seconds_bucket",
        "dchat_outbound_queue_depth",
        "dchat_received_bytes_total",
        "dchat_sent_bytes_total",
        "dchat_rejected_frames_total{code=\"rate_limited\"}",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert_eq!(relay_support::metric_value(&text, "dchat_sessions "), 1.0);
}

const TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test]
async fn admin_api_requires_token_and_snapshot_restores_into_empty_relay() {
    let r = start(|c| c.admin_token = Some(TOKEN.into())).await;
    let m = r.relay.metrics_addr;
    assert_eq!(http(m, "GET", "/admin/stats", None, b"").await.status, 401);
    assert_eq!(
        http(
            m,
            "GET",
            "/admin/stats",
            Some("wrong-token-xxxxxxxxxxx"),
            b""
        )
        .await
        .status,
        401
    );
    // Without the token a caller learns nothing, not even which methods a path takes.
    for (method, path) in [
        ("POST", "/admin/stats"),
        ("GET", "/admin/quiesce"),
        ("PUT", "/admin/restore"),
        ("DELETE", "/admin/snapshot"),
    ] {
        let answer = http(m, method, path, None, b"").await;
        assert_eq!(answer.status, 401, "{method} {path}");
    }
    // With it, a wrong method is 405 (and changes nothing).
    assert_eq!(
        http(m, "GET", "/admin/quiesce", Some(TOKEN), b"")
            .await
            .status,
        405
    );
    let bkey = generate_key().unwrap();
    let mut a = r.client().await;
    for i in 0..3 {
        a.send_text(public_key(&bkey), &format!("s{i}"))
            .await
            .unwrap();
    }
    let stats = http(m, "GET", "/admin/stats", Some(TOKEN), b"").await;
    assert_eq!(stats.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    assert_eq!(v["store"]["pending_messages"], 3);
    let snap = http(m, "GET", "/admin/snapshot", Some(TOKEN), b"").await;
    assert_eq!(snap.status, 200);
    assert!(snap.body.len() > 100);

    // Restore into a fresh relay, then the recipient gets the messages there.
    let r2 = start(|c| c.admin_token = Some(TOKEN.into())).await;
    let m2 = r2.relay.metrics_addr;
    let mut corrupt = snap.body.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let bad = http(m2, "POST", "/admin/restore", Some(TOKEN), &corrupt).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let ok = http(m2, "POST", "/admin/restore", Some(TOKEN), &snap.body).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let again = http(m2, "POST", "/admin/restore", Some(TOKEN), &snap.body).await;
    assert_eq!(
        again.status, 409,
        "restore into a non-empty store is refused"
    );
    let mut b = r2.client_as(&bkey).await;
    let mut texts = Vec::new();
    for _ in 0..3 {
        texts.push(String::from_utf8(b.next_delivery().await.unwrap().envelope.payload.0).unwrap());
    }
    assert_eq!(texts, ["s0", "s1", "s2"]);
}

#[tokio::test]
async fn admin_api_is_disabled_without_token() {
    let r = start(|_| {}).await;
    for (method, path) in [
        ("GET", "/admin/stats"),
        ("POST", "/admin/stats"),
        ("GET", "/admin/quiesce"),
        ("POST", "/admin/quiesce"),
        ("DELETE", "/admin/restore"),
    ] {
        let answer = http(
            r.relay.metrics_addr,
            method,
            path,
            Some("anything-at-all-123"),
            b"",
        )
        .await;
        assert_eq!(answer.status, 404, "{method} {path}");
    }
}

#[tokio::test]
async fn in_process_drain_closes_clients_with_reconnect_reason() {
    let r = start(|_| {}).await;
    let bkey = generate_key().unwrap();
    let mut a = r.client().await;
    let mut b = Client::connect(&r.url(), bkey.clone()).await.unwrap();
    let (mut raw, _) = raw_authed(&r.url()).await;
    a.send_text(b.key(), "unacked").await.unwrap();
    let d = b.next_delivery().await.unwrap();
    let report = r.relay.drain().await.unwrap();
    assert_eq!(
        announced_close(&mut raw).await,
        (ErrorCode::Draining, None, 1012)
    );
    assert_eq!(report.abandoned_connections, 0);
    assert!(report.flushed);
    match b.next_delivery().await {
        Err(ClientError::Closed { code, reason }) => {
            assert_eq!(code, 1012);
            assert!(reason.contains("reconnect"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The unacknowledged live message was stored during the drain.
    let r2 = {
        let dir = r.dir;
        let cfg = dchat_relay::config::Config::for_test(dir.path());
        let relay = dchat_relay::server::Relay::bind(cfg).await.unwrap().spawn();
        relay_support::TestRelay { relay, dir }
    };
    let mut b = r2.client_as(&bkey).await;
    let again = b.next_delivery().await.unwrap();
    assert_eq!(again.envelope.id, d.envelope.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_sent_right_after_recipient_connects_is_pushed_live() {
    let r = start(|_| {}).await;
    for _ in 0..20 {
        let mut a = r.client().await;
        let b = r.client().await;
        let s = a.send_text(b.key(), "x").await.unwrap();
        assert_eq!(s.status, SendStatus::Delivered);
    }
}

#[tokio::test]
async fn second_connection_of_a_key_replaces_the_first() {
    let r = start(|_| {}).await;
    let key = generate_key().unwrap();
    let (mut raw, _) = raw_authed_as(&r.url(), &key).await;
    let mut first = r.client_as(&key).await;
    assert_eq!(
        announced_close(&mut raw).await,
        (ErrorCode::Replaced, None, 4005)
    );
    let mut second = r.client_as(&key).await;
    match first.next_delivery().await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 4005),
        other => panic!("{other:?}"),
    }
    // The newer connection receives messages.
    let mut a = r.client().await;
    a.send_text(second.key(), "to the new one").await.unwrap();
    assert_eq!(
        second.next_delivery().await.unwrap().envelope.payload.0,
        b"to the new one"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let r = start(|c| c.max_connections = 1).await;
    let _one = r.client().await;
    match Client::connect(&r.url(), generate_key().unwrap()).await {
        Err(ClientError::Transport { source, .. }) => {
            assert!(source.to_string().contains("503"), "{source}");
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("second connection accepted"),
    }
    assert_eq!(
        r.metric("dchat_connections_closed_total{code=\"too_many_connections\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_valid_auth_frame_replayed_on_another_connection_fails() {
    let r = start(|_| {}).await;
    let key = generate_key().unwrap();
    // Connection 1: a genuine, successful authentication, recorded by an eavesdropper.
    let mut ws1 = connect_raw(&r.url()).await.unwrap();
    let ServerFrame::Challenge { nonce, .. } = next_frame(&mut ws1).await.unwrap() else {
        panic!()
    };
    let auth = serde_json::to_string(&ClientFrame::Auth {
        key: public_key(&key),
        sig: SigHex(key.sign(&auth_message(&nonce.0)).to_bytes()),
    })
    .unwrap();
    ws1.send(Message::Text(auth.clone().into())).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws1).await.unwrap(),
        ServerFrame::Welcome { .. }
    ));
    // Connection 2: the same frame, replayed, does not authenticate.
    let mut ws2 = connect_raw(&r.url()).await.unwrap();
    assert!(matches!(
        next_frame(&mut ws2).await.unwrap(),
        ServerFrame::Challenge { .. }
    ));
    ws2.send(Message::Text(auth.into())).await.unwrap();
    assert_eq!(
        announced_close(&mut ws2).await,
        (ErrorCode::AuthFailed, Some("auth".into()), 4001)
    );
}

#[tokio::test]
async fn peer_wake_all_is_deferred_not_dropped() {
    use dchat_relay::store::StoredMessage;
    let r = start(|_| {}).await;
    let mut b = r.client().await;
    let mut peer = connect_raw(&format!("ws://{}/v1/peer?instance=other", r.relay.addr))
        .await
        .unwrap();
    // Messages written to storage behind the relay's back (as another relay would),
    // announced only by wake_all notices, the second one right after the first.
    let far_future = i64::MAX / 2;
    for i in 0..2 {
        let from = public_key(&generate_key().unwrap());
        let env = serde_json::json!({"id": format!("w{i}"), "from": from, "to": b.key(), "ts": 1, "kind": "text", "payload": ""});
        r.relay
            .shared
            .store
            .put(StoredMessage {
                recipient: b.key().0,
                sender: from.0,
                id: format!("w{i}"),
                channel: None,
                timestamp_ms: 1,
                expires_at_ms: far_future,
                kind: "text".into(),
                envelope: env.to_string().into_bytes(),
            })
            .await
            .unwrap();
        peer.send(Message::Text(r#"{"type":"wake_all"}"#.into()))
            .await
            .unwrap();
        let d = b.next_delivery().await.unwrap();
        assert_eq!(d.envelope.id, format!("w{i}"));
    }
}

#[tokio::test]
async fn reconnect_gets_unacked_messages_before_newer_ones() {
    let r = start(|_| {}).await;
    let bkey = generate_key().unwrap();
    let mut a = r.client().await;
    for round in 0..5 {
        let mut b = r.client_as(&bkey).await;
        let first = format!("first {round}");
        assert_eq!(
            a.send_text(b.key(), &first).await.unwrap().status,
            SendStatus::Delivered
        );
        assert_eq!(
            b.next_delivery().await.unwrap().envelope.payload.0,
            first.as_bytes()
        );
        // Drop the connection without acknowledging, reconnect at once, and send more.
        drop(b);
        let mut b = r.client_as(&bkey).await;
        let second = format!("second {round}");
        a.send_text(b.key(), &second).await.unwrap();
        let d1 = b.next_delivery().await.unwrap();
        let d2 = b.next_delivery().await.unwrap();
        assert_eq!(d1.envelope.payload.0, first.as_bytes(), "round {round}");
        assert_eq!(d2.envelope.payload.0, second.as_bytes(), "round {round}");
        b.ack(vec![d1.ack_ref(), d2.ack_ref()]).await.unwrap();
        b.close().await;
    }
}

#[tokio::test]
async fn split_client_pipelines_sends_and_answers_come_in_order() {
    let r = start(|_| {}).await;
    let a = r.client().await;
    let mut b = r.client().await;
    let to = b.key();
    let (mut w, mut rd) = a.split();
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = w.fresh_id();
        ids.push(id.clone());
        let env = dchat_relay::protocol::Envelope {
            id,
            from: None,
            to: Some(to),
            channel: None,
            ts: i,
            kind: Kind::Text,
            payload: dchat_relay::protocol::Base64Bytes(vec![i as u8]),
            media: None,
        };
        w.send(env).await.unwrap();
    }
    for id in &ids {
        match rd.next_frame().await.unwrap() {
            ServerFrame::Sent {
                id: got, status, ..
            } => {
                assert_eq!(&got, id);
                assert_eq!(status, SendStatus::Delivered);
            }
            other => panic!("{other:?}"),
        }
    }
    for id in &ids {
        assert_eq!(&b.next_delivery().await.unwrap().envelope.id, id);
    }
}

// ---- channel membership cache (S2 fan-out without a store read per message) ----

/// The `sent` counts of one channel message from `from`.
async fn fan_out(from: &mut Client, channel: &str, text: &str) -> (Option<u32>, Option<u32>) {
    let env = from.envelope_channel(channel, Kind::Text, text.as_bytes().to_vec());
    let s = from.send(env).await.unwrap();
    assert_eq!(s.status, SendStatus::Fanout);
    (s.delivered, s.stored)
}

#[tokio::test]
async fn member_cache_follows_joins_and_leaves_on_a_single_relay() {
    let r = start(|_| {}).await;
    let shared = r.relay.shared.clone();
    assert!(
        shared.channels.enabled(),
        "single embedded relay caches members"
    );
    let mut a = r.client().await;
    let mut b = r.client().await;
    let mut c = r.client().await;
    a.join("cached").await.unwrap();
    b.join("cached").await.unwrap();
    // The first message loads the list into the cache.
    assert_eq!(fan_out(&mut a, "cached", "1").await, (Some(1), Some(0)));
    assert_eq!(shared.channels.len(), 1);
    assert_eq!(b.next_delivery().await.unwrap().envelope.payload.0, b"1");
    // A join after the list was cached is seen by the very next message.
    c.join("cached").await.unwrap();
    assert_eq!(fan_out(&mut a, "cached", "2").await, (Some(2), Some(0)));
    assert_eq!(b.next_delivery().await.unwrap().envelope.payload.0, b"2");
    assert_eq!(c.next_delivery().await.unwrap().envelope.payload.0, b"2");
    // So is a leave: B gets nothing more and can no longer post.
    b.leave("cached").await.unwrap();
    assert_eq!(fan_out(&mut a, "cached", "3").await, (Some(1), Some(0)));
    assert_eq!(c.next_delivery().await.unwrap().envelope.payload.0, b"3");
    let env = b.envelope_channel("cached", Kind::Text, b"x".to_vec());
    match b.send(env).await {
        Err(ClientError::Relay { code, .. }) => assert_eq!(code, ErrorCode::NotMember),
        other => panic!("{other:?}"),
    }
    // Rejoining (and a member going offline) is seen too: C offline gets a stored copy.
    b.join("cached").await.unwrap();
    c.close().await;
    for _ in 0..200 {
        if r.metric("dchat_sessions ") == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fan_out(&mut a, "cached", "4").await, (Some(1), Some(1)));
    assert_eq!(b.next_delivery().await.unwrap().envelope.payload.0, b"4");
}

#[tokio::test]
async fn channel_memberships_survive_a_restart_with_an_empty_cache() {
    let dir = tempdir::TempDir::new("relay-restart");
    let (ka, kb) = (generate_key().unwrap(), generate_key().unwrap());
    let cfg = dchat_relay::config::Config::for_test(dir.path());
    let relay = dchat_relay::server::Relay::bind(cfg.clone())
        .await
        .unwrap()
        .spawn();
    let url = relay.ws_url();
    let mut a = Client::connect(&url, ka.clone()).await.unwrap();
    let mut b = Client::connect(&url, kb.clone()).await.unwrap();
    a.join("kept").await.unwrap();
    b.join("kept").await.unwrap();
    assert_eq!(fan_out(&mut a, "kept", "before").await, (Some(1), Some(0)));
    let d = b.next_delivery().await.unwrap();
    b.ack(vec![d.ack_ref()]).await.unwrap();
    drop((a, b));
    relay.drain().await.unwrap();

    let relay = dchat_relay::server::Relay::bind(cfg).await.unwrap().spawn();
    assert!(relay.shared.channels.is_empty());
    let url = relay.ws_url();
    let mut a = Client::connect(&url, ka).await.unwrap();
    let mut b = Client::connect(&url, kb).await.unwrap();
    // Memberships come from the store; nobody joined again.
    assert_eq!(fan_out(&mut a, "kept", "after").await, (Some(1), Some(0)));
    assert_eq!(
        b.next_delivery().await.unwrap().envelope.payload.0,
        b"after"
    );
    assert_eq!(relay.shared.channels.len(), 1);
    drop((a, b));
    relay.drain().await.unwrap();
}

#[tokio::test]
async fn member_cache_is_off_when_other_relays_may_change_memberships() {
    // A relay with peers shares its store with other relays: their joins would not
    // reach this relay's cache, so it reads the store for every channel message.
    let r = start(|cfg| cfg.peers = vec!["ws://127.0.0.1:9".into()]).await;
    assert!(!r.relay.shared.channels.enabled());
    let mut a = r.client().await;
    let mut b = r.client().await;
    a.join("shared").await.unwrap();
    b.join("shared").await.unwrap();
    assert_eq!(fan_out(&mut a, "shared", "1").await, (Some(1), Some(0)));
    assert!(r.relay.shared.channels.is_empty());
    assert_eq!(b.next_delivery().await.unwrap().envelope.payload.0, b"1");
}

#[tokio::test]
async fn coalesced_answers_and_pushes_keep_their_order() {
    // A pipelining client: its sends' answers and the pushes addressed to it are
    // written together when they are due together; each stream keeps its order.
    let r = start(|_| {}).await;
    let a = r.client().await;
    let b = r.client().await;
    let (ka, kb) = (a.key(), b.key());
    let (mut wa, mut ra) = a.split();
    let (mut wb, mut rb) = b.split();
    let n = 200;
    for i in 0..n {
        for (w, to) in [(&mut wa, kb), (&mut wb, ka)] {
            let env = dchat_relay::protocol::Envelope {
                id: format!("m{i}"),
                from: None,
                to: Some(to),
                channel: None,
                ts: i,
                kind: Kind::Text,
                payload: dchat_relay::protocol::Base64Bytes(i.to_le_bytes().to_vec()),
                media: None,
            };
            w.send(env).await.unwrap();
        }
    }
    for (rd, w) in [(&mut ra, &mut wa), (&mut rb, &mut wb)] {
        let (mut sent, mut delivered) = (0i64, 0i64);
        while sent < n || delivered < n {
            match rd.next_frame().await.unwrap() {
                ServerFrame::Sent { id, status, .. } => {
                    assert_eq!(id, format!("m{sent}"));
                    assert_ne!(status, SendStatus::Duplicate);
                    sent += 1;
                }
                ServerFrame::Deliver { envelope, .. } => {
                    assert_eq!(envelope.id, format!("m{delivered}"));
                    w.write(&ClientFrame::Ack {
                        messages: vec![dchat_relay::protocol::AckRef {
                            from: envelope.from.unwrap(),
                            id: envelope.id,
                        }],
                        quiet: false,
                    })
                    .await
                    .unwrap();
                    delivered += 1;
                }
                ServerFrame::Acked { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn pipelined_sends_to_offline_recipients_are_stored_together_and_answered_in_order() {
    // Sends to recipients that are not connected are stored in batches (one durable
    // write per burst). Whatever else is in the burst — a retry of an id still in the
    // batch, an invalid envelope, a ping, a live push — must still be answered in
    // request order, and the offline recipient must get its messages in order, once.
    let r = start(|_| {}).await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    let offline_key = generate_key().unwrap();
    let offline = public_key(&offline_key);
    let online_key = generate_key().unwrap();
    let mut online = r.client_as(&online_key).await;
    let env = |id: &str, to: KeyHex| dchat_relay::protocol::Envelope {
        id: id.to_string(),
        from: None,
        to: Some(to),
        channel: None,
        ts: 1,
        kind: Kind::Text,
        payload: dchat_relay::protocol::Base64Bytes(id.as_bytes().to_vec()),
        media: None,
    };
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for i in 0..10 {
        let id = format!("m{i}");
        frames.push(ClientFrame::Send {
            envelope: env(&id, offline),
        });
        expected.push(format!("sent {id} stored"));
        if i == 3 {
            // A retry of m3 while m3 is still waiting in the batch.
            frames.push(ClientFrame::Send {
                envelope: env("m3", offline),
            });
            expected.push("sent m3 duplicate".into());
        }
        if i == 5 {
            let mut bad = env("bad", offline);
            bad.channel = Some("both-set".into());
            frames.push(ClientFrame::Send { envelope: bad });
            expected.push("error invalid_envelope bad".into());
            frames.push(ClientFrame::Ping {
                nonce: Some("p".into()),
            });
            expected.push("pong".into());
            frames.push(ClientFrame::Send {
                envelope: env("live", public_key(&online_key)),
            });
            expected.push("sent live delivered".into());
        }
    }
    // One write: the relay reads the whole burst before it answers.
    for f in &frames {
        ws.feed(Message::Text(serde_json::to_string(f).unwrap().into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let mut got = Vec::new();
    let mut seqs = Vec::new();
    for _ in 0..expected.len() {
        got.push(match next_frame(&mut ws).await.unwrap() {
            ServerFrame::Sent {
                id, status, seq, ..
            } => {
                seqs.extend(seq);
                format!(
                    "sent {id} {}",
                    serde_json::to_value(status).unwrap().as_str().unwrap()
                )
            }
            ServerFrame::Error {
                code, reference, ..
            } => format!("error {} {}", code.as_str(), reference.unwrap_or_default()),
            ServerFrame::Pong { .. } => "pong".into(),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(got, expected);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs {seqs:?}");
    // Ten stored messages, split into batches only by the frames that must be answered
    // in between (the retry, the invalid envelope): far fewer storage writes than ten.
    let writes = r.metric("dchat_store_operation_seconds_count{op=\"put_many\"}");
    assert!((1.0..10.0).contains(&writes), "{writes} batch writes");
    assert_eq!(
        r.metric("dchat_store_operation_seconds_count{op=\"put\"}"),
        0.0
    );
    assert_eq!(online.next_delivery().await.unwrap().envelope.id, "live");

    // The offline recipient connects later: all ten, in order, once.
    let mut rcpt = r.client_as(&offline_key).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let d = rcpt.next_delivery().await.unwrap();
        assert_eq!(d.envelope.payload.0, d.envelope.id.as_bytes());
        ids.push(d.envelope.id.clone());
        rcpt.ack(vec![d.ack_ref()]).await.unwrap();
    }
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want);
    let (rest, more) = rcpt.fetch(100).await.unwrap();
    assert!(rest.is_empty() && !more, "left over: {rest:?}");
}

/// Delegates to an embedded store but fails, as a storage error would, every write that
/// contains a message whose id starts with "poison" — a batch with one such message fails
/// as a whole — and counts the stored messages `pending` returns.
struct TestStore {
    inner: std::sync::Arc<dyn dchat_relay::store::Store>,
    rows_read: std::sync::atomic::AtomicUsize,
}

/// An in-process relay on a [`TestStore`] over an embedded store.
async fn start_on_test_store() -> (relay_support::TestRelay, std::sync::Arc<TestStore>) {
    let dir = tempdir::TempDir::new("teststore");
    let inner = std::sync::Arc::new(dchat_relay::store::EmbeddedStore::open(dir.path()).unwrap());
    let store = std::sync::Arc::new(TestStore {
        inner: inner.clone(),
        rows_read: Default::default(),
    });
    let storage = dchat_relay::server::Storage {
        store: store.clone(),
        embedded: Some(inner),
    };
    let relay = dchat_relay::server::Relay::bind_with_storage(
        dchat_relay::config::Config::for_test(dir.path()),
        storage,
    )
    .await
    .unwrap()
    .spawn();
    (relay_support::TestRelay { relay, dir }, store)
}

fn poisoned(m: &dchat_relay::store::StoredMessage) -> bool {
    m.id.starts_with("poison")
}

fn injected() -> dchat_relay::store::StoreError {
    dchat_relay::store::StoreError::Task {
        op: "put",
        reason: "injected failure".into(),
    }
}

#[async_trait::async_trait]
impl dchat_relay::store::Store for TestStore {
    async fn put(
        &self,
        msg: dchat_relay::store::StoredMessage,
    ) -> Result<dchat_relay::store::PutOutcome, dchat_relay::store::StoreError> {
        if poisoned(&msg) {
            return Err(injected());
        }
        self.inner.put(msg).await
    }
    async fn put_many(
        &self,
        msgs: Vec<dchat_relay::store::StoredMessage>,
    ) -> Result<Vec<dchat_relay::store::PutOutcome>, dchat_relay::store::StoreError> {
        if msgs.iter().any(poisoned) {
            return Err(injected());
        }
        self.inner.put_many(msgs).await
    }
    async fn pending(
        &self,
        recipient: &dchat_relay::store::PublicKey,
        after_seq: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<dchat_relay::store::Pending>, dchat_relay::store::StoreError> {
        let rows = self
            .inner
            .pending(recipient, after_seq, limit, now_ms)
            .await?;
        self.rows_read
            .fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(rows)
    }
    async fn ack(
        &self,
        recipient: &dchat_relay::store::PublicKey,
        keys: Vec<dchat_relay::store::AckKey>,
    ) -> Result<u64, dchat_relay::store::StoreError> {
        if keys.iter().any(|k| k.id.starts_with("unackable")) {
            return Err(injected());
        }
        self.inner.ack(recipient, keys).await
    }
    async fn expire(&self, now_ms: i64) -> Result<u64, dchat_relay::store::StoreError> {
        self.inner.expire(now_ms).await
    }
    async fn put_profile(
        &self,
        key: &dchat_relay::store::PublicKey,
        profile: Vec<u8>,
        updated_ms: i64,
    ) -> Result<bool, dchat_relay::store::StoreError> {
        self.inner.put_profile(key, profile, updated_ms).await
    }
    async fn get_profile(
        &self,
        key: &dchat_relay::store::PublicKey,
    ) -> Result<Option<Vec<u8>>, dchat_relay::store::StoreError> {
        self.inner.get_profile(key).await
    }
    async fn join_channel(
        &self,
        channel: &str,
        member: &dchat_relay::store::PublicKey,
    ) -> Result<(), dchat_relay::store::StoreError> {
        self.inner.join_channel(channel, member).await
    }
    async fn leave_channel(
        &self,
        channel: &str,
        member: &dchat_relay::store::PublicKey,
    ) -> Result<(), dchat_relay::store::StoreError> {
        self.inner.leave_channel(channel, member).await
    }
    async fn channel_members(
        &self,
        channel: &str,
    ) -> Result<Vec<dchat_relay::store::PublicKey>, dchat_relay::store::StoreError> {
        self.inner.channel_members(channel).await
    }
    async fn check(&self) -> Result<(), dchat_relay::store::StoreError> {
        self.inner.check().await
    }
    async fn flush(&self) -> Result<(), dchat_relay::store::StoreError> {
        self.inner.flush().await
    }
    async fn stats(
        &self,
    ) -> Result<dchat_relay::store::StoreStats, dchat_relay::store::StoreError> {
        self.inner.stats().await
    }
}

#[tokio::test]
async fn a_batch_that_fails_is_stored_message_by_message_with_an_answer_each() {
    // One message of a pipelined burst cannot be stored: the batch write fails, the
    // relay stores the others one by one, and every send gets its own answer in order
    // (the failed one `storage_unavailable`, the others `stored`).
    let (r, _) = start_on_test_store().await;
    let (mut ws, _) = raw_authed(&r.url()).await;
    let rcpt_key = generate_key().unwrap();
    let rcpt = public_key(&rcpt_key);
    let ids = ["m0", "poison", "m2"];
    for id in ids {
        let f = ClientFrame::Send {
            envelope: dchat_relay::protocol::Envelope {
                id: id.into(),
                from: None,
                to: Some(rcpt),
                channel: None,
                ts: 1,
                kind: Kind::Text,
                payload: dchat_relay::protocol::Base64Bytes(id.as_bytes().to_vec()),
                media: None,
            },
        };
        ws.feed(Message::Text(serde_json::to_string(&f).unwrap().into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let mut got = Vec::new();
    for _ in ids {
        got.push(match next_frame(&mut ws).await.unwrap() {
            ServerFrame::Sent { id, status, .. } => format!("{id} {status:?}"),
            ServerFrame::Error {
                code, reference, ..
            } => format!("{} {}", reference.unwrap_or_default(), code.as_str()),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        got,
        [
            "m0 Stored".to_string(),
            "poison storage_unavailable".into(),
            "m2 Stored".into()
        ]
    );
    // The batch write was tried (and failed) before the one-by-one puts.
    assert!(r.metric("dchat_store_operation_seconds_count{op=\"put_many\"}") >= 1.0);
    assert_eq!(
        r.metric("dchat_store_operation_seconds_count{op=\"put\"}"),
        3.0
    );
    let mut c = r.client_as(&rcpt_key).await;
    let (ds, more) = c.fetch(10).await.unwrap();
    let delivered: Vec<_> = ds.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(delivered, ["m0", "m2"]);
    assert!(!more);
}

#[tokio::test]
async fn stored_messages_in_flight_are_not_read_again() {
    // A recipient with a backlog gets it pushed at connect; a `fetch` (and the pumps
    // after each ack) must not read the messages already in flight again. Everything
    // is still delivered once, in order, and the backlog beyond the in-flight window
    // follows the acks.
    let (r, store) = start_on_test_store().await;
    let mut sender = r.client().await;
    let rcpt_key = generate_key().unwrap();
    let rcpt = public_key(&rcpt_key);
    let n = 300; // more than the in-flight window (256)
    for i in 0..n {
        let s = sender.send_text(rcpt, &format!("{i}")).await.unwrap();
        assert_eq!(s.status, SendStatus::Stored);
    }
    let reads_before = store.rows_read.load(std::sync::atomic::Ordering::Relaxed);
    let mut c = r.client_as(&rcpt_key).await;
    let mut texts = Vec::new();
    loop {
        let (ds, more) = c.fetch(1000).await.unwrap();
        if ds.is_empty() && !more {
            break;
        }
        let refs: Vec<_> = ds.iter().map(|d| d.ack_ref()).collect();
        texts.extend(
            ds.into_iter()
                .map(|d| String::from_utf8(d.envelope.payload.0).unwrap()),
        );
        for chunk in refs.chunks(64) {
            c.ack(chunk.to_vec()).await.unwrap();
        }
    }
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(texts, want);
    // Each stored message is read once, plus the pages a pump reads before it stops at
    // the full window (at most one page of 128 per pump); before, every fetch and every
    // pump re-read all 256 in flight.
    let read = store.rows_read.load(std::sync::atomic::Ordering::Relaxed) - reads_before;
    assert!(read < n + 2 * 128, "{read} rows read for {n} messages");
}

#[tokio::test]
async fn caught_up_session_fetch_reads_no_storage_until_something_is_stored_for_it() {
    // A reconnect drain ends with a `fetch` that finds nothing: a session that read its
    // whole backlog and has been live since answers it without a storage read. Once a
    // message for it is stored (it fell behind: a full in-flight window), fetches read
    // storage again and find it.
    let r = start(|c| c.max_inflight = 2).await;
    let pending_reads = || r.metric("dchat_store_operation_seconds_count{op=\"pending\"}");
    let rcpt_key = generate_key().unwrap();
    let rcpt = public_key(&rcpt_key);
    let mut sender = r.client().await;
    for i in 0..2 {
        let s = sender
            .send_text(rcpt, &format!("stored {i}"))
            .await
            .unwrap();
        assert_eq!(s.status, SendStatus::Stored);
    }
    let mut c = r.client_as(&rcpt_key).await;
    let (backlog, more) = c.fetch(10).await.unwrap();
    assert_eq!(backlog.len(), 2, "the backlog is pushed at connect");
    assert!(!more);
    c.ack(backlog.iter().map(|d| d.ack_ref()).collect())
        .await
        .unwrap();
    let before = pending_reads();
    assert!(before >= 1.0, "the connect read storage");
    for _ in 0..3 {
        let (ds, more) = c.fetch(10).await.unwrap();
        assert!(ds.is_empty() && !more, "{ds:?} {more}");
    }
    assert_eq!(pending_reads(), before, "a caught-up fetch read storage");

    // Two live pushes fill the window, so the session falls behind and the next
    // message is stored for it.
    let mut pushed = Vec::new();
    for i in 0..2 {
        let s = sender.send_text(rcpt, &format!("live {i}")).await.unwrap();
        assert_eq!(s.status, SendStatus::Delivered);
        pushed.push(c.next_delivery().await.unwrap());
    }
    let s = sender.send_text(rcpt, "live 2").await.unwrap();
    assert_eq!(s.status, SendStatus::Stored);
    let reads_behind = pending_reads();
    let (ds, more) = c.fetch(10).await.unwrap();
    assert!(ds.is_empty() && more, "window full: {ds:?} {more}");
    assert!(
        pending_reads() > reads_behind,
        "a session behind must read storage"
    );
    c.ack(pushed.iter().map(|d| d.ack_ref()).collect())
        .await
        .unwrap();
    let stored = c.next_delivery().await.unwrap();
    assert_eq!(stored.envelope.payload.0, b"live 2");
    assert!(stored.seq.is_some(), "delivered from storage");
}

#[tokio::test]
async fn quiet_ack_removes_messages_without_an_answer_and_reports_only_failures() {
    let (r, _) = start_on_test_store().await;
    let bkey = generate_key().unwrap();
    let bpub = public_key(&bkey);
    let mut a = r.client().await;
    for id in ["m0", "m1", "unackable"] {
        let mut env = a.envelope_to(bpub, Kind::Text, id.as_bytes().to_vec());
        env.id = id.into();
        assert_eq!(a.send(env).await.unwrap().status, SendStatus::Stored);
    }
    let mut b = r.client_as(&bkey).await;
    assert!(
        b.features()
            .iter()
            .any(|f| f == dchat_relay::protocol::FEATURE_QUIET_ACK),
        "welcome announces quiet acks: {:?}",
        b.features()
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(b.next_delivery().await.unwrap());
    }
    let ids: Vec<_> = got.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, ["m0", "m1", "unackable"]);

    // A quiet ack gets no answer: the next frame is the pong (an `acked` first would
    // make `ping` fail with an unexpected frame).
    b.ack_quiet(got[..2].iter().map(|d| d.ack_ref()).collect())
        .await
        .unwrap();
    b.ping().await.unwrap();
    assert_eq!(b.failed_quiet_acks(), 0);
    assert_eq!(r.metric("dchat_messages_acked_total"), 2.0);

    // A quiet ack that fails is still reported, with an error frame about `ack`.
    b.ack_quiet(vec![got[2].ack_ref()]).await.unwrap();
    b.ping().await.unwrap();
    assert_eq!(b.failed_quiet_acks(), 1);

    // Too many references is refused whether or not the ack is quiet.
    let (mut ws, _) = raw_authed(&r.url()).await;
    let refs = vec![got[0].ack_ref(); dchat_relay::protocol::frame::MAX_ACK_BATCH + 1];
    let f = ClientFrame::Ack {
        messages: refs,
        quiet: true,
    };
    ws.send(Message::Text(serde_json::to_string(&f).unwrap().into()))
        .await
        .unwrap();
    let ServerFrame::Error {
        code,
        reference,
        quiet,
        close,
        ..
    } = next_frame(&mut ws).await.unwrap()
    else {
        panic!("no error for an oversized quiet ack")
    };
    assert_eq!(
        (code, reference.as_deref(), quiet, close),
        (ErrorCode::BadFrame, Some("ack"), true, None)
    );

    // The quietly acknowledged messages are gone; the one whose ack failed is not.
    b.close().await;
    let mut b = r.client_as(&bkey).await;
    let (rest, more) = b.fetch(100).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, ["unackable"]);
    assert!(!more);
}

#[tokio::test]
async fn deferred_acks_travel_with_the_next_frame_and_remove_live_messages() {
    let r = start(|_| {}).await;
    let bkey = generate_key().unwrap();
    let bpub = public_key(&bkey);
    let (mut bw, mut br) = r.client_as(&bkey).await.split();
    let mut a = r.client().await;
    for i in 0..3 {
        let env = a.envelope_to(bpub, Kind::Text, format!("live {i}").into_bytes());
        assert_eq!(a.send(env).await.unwrap().status, SendStatus::Delivered);
    }
    let mut refs = Vec::new();
    for _ in 0..3 {
        match br.next_frame().await.unwrap() {
            ServerFrame::Deliver { envelope, .. } => refs.push(AckRef {
                from: envelope.from.unwrap(),
                id: envelope.id,
            }),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    assert_eq!(r.metric("dchat_inflight_deliveries"), 3.0);

    // Deferred acks stay with the client until it writes its next frame.
    bw.defer_ack(refs[..2].to_vec());
    assert_eq!(bw.deferred_acks(), 2);
    bw.write(&ClientFrame::Ping { nonce: None }).await.unwrap();
    assert_eq!(bw.deferred_acks(), 0);
    // Quiet: the next frame is the pong, with no `acked` in front of it.
    let pong = br.next_frame().await.unwrap();
    assert!(matches!(pong, ServerFrame::Pong { .. }), "{pong:?}");
    assert_eq!(r.metric("dchat_messages_acked_total"), 2.0);
    assert_eq!(r.metric("dchat_inflight_deliveries"), 1.0);

    // Or when the caller's delay is up, on their own.
    bw.defer_ack(vec![refs[2].clone()]);
    bw.flush_acks().await.unwrap();
    bw.flush_acks().await.unwrap(); // nothing queued: writes nothing
    bw.write(&ClientFrame::Ping { nonce: None }).await.unwrap();
    let pong = br.next_frame().await.unwrap();
    assert!(matches!(pong, ServerFrame::Pong { .. }), "{pong:?}");
    assert_eq!(r.metric("dchat_messages_acked_total"), 3.0);
    assert_eq!(r.metric("dchat_inflight_deliveries"), 0.0);

    // Nothing was stored again when the connection ended: every message was acked.
    drop((bw, br));
    let mut b = r.client_as(&bkey).await;
    let (rest, more) = b.fetch(100).await.unwrap();
    assert!(rest.is_empty() && !more, "{rest:?}");
}

/// Blocks the (single-threaded) test runtime for `block` at a time, yielding in
/// between, until `stop` is set: every task of the in-process relay runs that late,
/// as on a relay whose core cannot keep up.
fn saturate_runtime(
    block: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(block);
            tokio::task::yield_now().await;
        }
    })
}

/// `b` gets the message `id`, acknowledges it, and gets nothing more.
async fn receive_exactly_once(b: &mut Client, id: &str) {
    let d = b.next_delivery().await.unwrap();
    assert_eq!(d.envelope.id, id);
    b.ack(vec![d.ack_ref()]).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.next_delivery())
            .await
            .is_err()
    );
}

/// Waits until the relay's shedding gauge shows `on`.
async fn shedding_becomes(r: &relay_support::TestRelay, on: bool, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if (r.metric("dchat_overload_shedding ") == 1.0) == on {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn an_overloaded_relay_refuses_sends_and_takes_the_retry_once_it_recovered() {
    let r = start(|c| c.shed_delay = Duration::from_millis(100)).await;
    let mut a = r.client().await;
    let mut b = r.client().await;
    let env = a.envelope_to(b.key(), Kind::Text, b"under load".to_vec());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blocker = saturate_runtime(Duration::from_millis(150), stop.clone());
    assert!(shedding_becomes(&r, true, Duration::from_secs(10)).await);
    match a.send(env.clone()).await {
        Err(ClientError::Relay { code, .. }) => assert_eq!(code, ErrorCode::Overloaded),
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert!(r.metric(r#"dchat_rejected_frames_total{code="overloaded"}"#) >= 1.0);
    // Acknowledgements and other requests are still served while sends are refused.
    a.ping().await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    blocker.await.unwrap();
    assert!(shedding_becomes(&r, false, Duration::from_secs(10)).await);
    // The retry with the same id goes through, and is delivered once.
    let s = a.send(env.clone()).await.unwrap();
    assert_eq!(s.status, SendStatus::Delivered);
    receive_exactly_once(&mut b, &env.id).await;
}

#[tokio::test]
async fn send_retrying_gets_through_once_the_relay_stops_shedding() {
    let r = start(|c| c.shed_delay = Duration::from_millis(100)).await;
    let mut a = r.client().await;
    let mut b = r.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blocker = saturate_runtime(Duration::from_millis(150), stop.clone());
    assert!(shedding_becomes(&r, true, Duration::from_secs(10)).await);
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let env = a.envelope_to(b.key(), Kind::Text, b"eventually".to_vec());
    let s = a.send_retrying(env.clone(), 30).await.unwrap();
    assert_eq!(s.status, SendStatus::Delivered);
    assert!(r.metric(r#"dchat_rejected_frames_total{code="overloaded"}"#) >= 1.0);
    stopper.await.unwrap();
    blocker.await.unwrap();
    receive_exactly_once(&mut b, &env.id).await;
}

#[tokio::test]
async fn slow_stores_for_recipients_that_fell_behind_also_shed_sends() {
    let r = start(|c| c.shed_delay = Duration::from_millis(100)).await;
    let mut a = r.client().await;
    let b = r.client().await;
    // What a store for recipients connected here that fell behind reports when it took
    // longer than the shed delay (the runtime itself is not late here).
    r.relay
        .shared
        .overload
        .note_behind_store(Duration::from_millis(400));
    assert!(shedding_becomes(&r, true, Duration::from_secs(10)).await);
    let env = a.envelope_to(b.key(), Kind::Text, b"x".to_vec());
    match a.send(env.clone()).await {
        Err(ClientError::Relay { code, .. }) => assert_eq!(code, ErrorCode::Overloaded),
        other => panic!("expected overloaded, got {other:?}"),
    }
    // One slow store sheds for a while, not for good.
    assert!(shedding_becomes(&r, false, Duration::from_secs(10)).await);
    assert_eq!(a.send(env).await.unwrap().status, SendStatus::Delivered);
}

#[tokio::test]
async fn shedding_is_off_with_a_zero_shed_delay() {
    let r = start(|c| c.shed_delay = Duration::ZERO).await;
    let mut a = r.client().await;
    let b = r.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blocker = saturate_runtime(Duration::from_millis(150), stop.clone());
    r.relay
        .shared
        .overload
        .note_behind_store(Duration::from_secs(1));
    for i in 0..3 {
        let env = a.envelope_to(b.key(), Kind::Text, vec![i]);
        assert_eq!(a.send(env).await.unwrap().status, SendStatus::Delivered);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    blocker.await.unwrap();
    assert_eq!(r.metric("dchat_overload_shedding "), 0.0);
}

// ---- sends and the client's close in one write ----

/// A text envelope with this id, its id as payload.
fn envelope_with_id(id: &str, to: KeyHex) -> dchat_relay::protocol::Envelope {
    dchat_relay::protocol::Envelope {
        id: id.to_string(),
        from: None,
        to: Some(to),
        channel: None,
        ts: 1,
        kind: Kind::Text,
        payload: dchat_relay::protocol::Base64Bytes(id.as_bytes().to_vec()),
        media: None,
    }
}

/// Writes a `send` for each of `sends` and then the client's close frame, all in one
/// TCP write (the raw client buffers frames until a flush; sending the close flushes).
async fn sends_then_close(ws: &mut Raw, sends: &[(String, KeyHex)]) {
    for (id, to) in sends {
        let send = ClientFrame::Send {
            envelope: envelope_with_id(id, *to),
        };
        ws.feed(Message::Text(serde_json::to_string(&send).unwrap().into()))
            .await
            .unwrap();
    }
    ws.send(Message::Close(None)).await.unwrap();
}

/// A burst of sends, half to a recipient connected here (pushed) and half to one that
/// is not (stored together in a batch), then the sender's close.
struct CloseBurst {
    sender: ed25519_dalek::SigningKey,
    online: dchat_relay::client::Client,
    offline: ed25519_dalek::SigningKey,
    sends: Vec<(String, KeyHex)>,
}

async fn close_burst(r: &relay_support::TestRelay, n: usize) -> CloseBurst {
    let online_key = generate_key().unwrap();
    let online = r.client_as(&online_key).await;
    let offline = generate_key().unwrap();
    let sends = (0..n)
        .map(|i| {
            let to = if i < n / 2 { &online_key } else { &offline };
            (format!("burst-{i}"), public_key(to))
        })
        .collect();
    CloseBurst {
        sender: generate_key().unwrap(),
        online,
        offline,
        sends,
    }
}

impl CloseBurst {
    /// Each recipient gets its messages exactly once, in order; a resend of every id
    /// is answered `duplicate` and delivers nothing (the next delivery of each
    /// recipient is a message sent after the resends).
    async fn check_delivered_exactly_once(mut self, r: &relay_support::TestRelay) {
        let mut offline = r.client_as(&self.offline).await;
        for (rcpt, to) in [
            (&mut self.online, self.sends[0].1),
            (&mut offline, public_key(&self.offline)),
        ] {
            for (id, _) in self.sends.iter().filter(|(_, t)| *t == to) {
                let d = rcpt.next_delivery().await.unwrap();
                assert_eq!(&d.envelope.id, id);
                rcpt.ack(vec![d.ack_ref()]).await.unwrap();
            }
        }
        let mut again = r.client_as(&self.sender).await;
        for (id, to) in &self.sends {
            let res = again.send(envelope_with_id(id, *to)).await.unwrap();
            assert_eq!(res.status, SendStatus::Duplicate, "{id}");
        }
        for (rcpt, to) in [
            (&mut self.online, self.sends[0].1),
            (&mut offline, public_key(&self.offline)),
        ] {
            let after = format!("after-{to}");
            again.send(envelope_with_id(&after, to)).await.unwrap();
            assert_eq!(rcpt.next_delivery().await.unwrap().envelope.id, after);
        }
    }
}

/// A client that writes sends and its close frame in one burst gets every send
/// processed and answered before the relay's close reply: each `sent` (pushed or
/// stored), then the close frame; the messages are delivered exactly once.
#[tokio::test]
async fn sends_written_with_the_close_are_answered_before_the_close_reply() {
    let r = start(|_| {}).await;
    let burst = close_burst(&r, 50).await;
    let (mut ws, _) = raw_authed_as(&r.url(), &burst.sender).await;
    sends_then_close(&mut ws, &burst.sends).await;
    for (i, (id, _)) in burst.sends.iter().enumerate() {
        match next_frame(&mut ws).await {
            Ok(ServerFrame::Sent {
                id: got, status, ..
            }) => {
                assert_eq!(&got, id);
                let want = if i < 25 {
                    SendStatus::Delivered
                } else {
                    SendStatus::Stored
                };
                assert_eq!(status, want, "{id}");
            }
            other => panic!("answer {i} to {id}: {other:?}"),
        }
    }
    // Then the relay's close reply, and nothing else.
    assert_eq!(next_frame(&mut ws).await, Err((1000, String::new())));
    burst.check_delivered_exactly_once(&r).await;
}

/// The same burst from a client that closes its TCP connection right after writing
/// it, without reading: the relay's answers cannot be written, but every send it read
/// is stored or delivered all the same, exactly once.
#[tokio::test]
async fn sends_written_with_the_close_by_a_client_that_left_are_still_delivered_once() {
    let r = start(|_| {}).await;
    let burst = close_burst(&r, 50).await;
    let (mut ws, _) = raw_authed_as(&r.url(), &burst.sender).await;
    sends_then_close(&mut ws, &burst.sends).await;
    drop(ws);
    burst.check_delivered_exactly_once(&r).await;
}

/// An `ack` naming an id far longer than any message id (one no store index could
/// hold) matches nothing, and the store goes on working for everyone.
#[tokio::test]
async fn an_ack_of_an_impossibly_long_id_removes_nothing_and_breaks_nothing() {
    let r = start(|_| {}).await;
    let (mut raw, _) = raw_authed(&r.url()).await;
    let sender = "ab".repeat(32);
    let huge = "x".repeat(70_000);
    send_text(
        &mut raw,
        &format!(r#"{{"type":"ack","messages":[{{"from":"{sender}","id":"{huge}"}}]}}"#),
    )
    .await;
    assert_eq!(
        next_frame(&mut raw).await.unwrap(),
        ServerFrame::Acked { removed: 0 }
    );
    // Writes still work: a join, and a message stored for an offline recipient.
    send_text(&mut raw, r#"{"type":"join","channel":"after-the-ack"}"#).await;
    assert!(matches!(
        next_frame(&mut raw).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut a = r.client().await;
    let offline = public_key(&generate_key().unwrap());
    let sent = a.send_text(offline, "kept").await.unwrap();
    assert_eq!(sent.status, SendStatus::Stored);
}
