//! The bare tokio WebSocket key→sender router: the on-box limit for S1.
//!
//! Protocol: the client's first (text) message is its 32-byte key in hex. Then every
//! binary message is `recipient key (32 bytes) || payload`; the router forwards the
//! payload as a binary message to the recipient's connection if it is connected (and
//! its queue has room), else drops it. No auth, no JSON, no storage, no acks: it is the
//! least work a WebSocket router can do, so the relay's ratio to it shows its overhead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::BenchError;

type Routes = Arc<RwLock<HashMap<[u8; 32], mpsc::Sender<Message>>>>;

/// Serves the router on `addr` until the process is killed.
pub async fn serve(addr: SocketAddr) -> Result<(), BenchError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BenchError::Io {
            what: format!("router binding {addr}"),
            source,
        })?;
    let routes: Routes = Arc::default();
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        tokio::spawn(connection(sock, routes.clone()));
    }
}

async fn connection(sock: TcpStream, routes: Routes) {
    let Ok(ws) = tokio_tungstenite::accept_async(sock).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let key = match stream.next().await {
        Some(Ok(Message::Text(t))) => {
            let mut k = [0u8; 32];
            match hex_to_key(t.as_str(), &mut k) {
                true => k,
                false => return,
            }
        }
        _ => return,
    };
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    if let Ok(mut r) = routes.write() {
        r.insert(key, tx);
    }
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(m)) = stream.next().await {
        let Message::Binary(b) = m else { continue };
        if b.len() < 32 {
            continue;
        }
        let mut to = [0u8; 32];
        to.copy_from_slice(&b[..32]);
        let dest = routes.read().ok().and_then(|r| r.get(&to).cloned());
        if let Some(d) = dest {
            let _ = d.try_send(Message::Binary(b.slice(32..)));
        }
    }
    if let Ok(mut r) = routes.write() {
        r.remove(&key);
    }
    writer.abort();
}

fn hex_to_key(s: &str, out: &mut [u8; 32]) -> bool {
    let b = s.as_bytes();
    if b.len() != 64 {
        return false;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16);
        let lo = (b[2 * i + 1] as char).to_digit(16);
        match (hi, lo) {
            (Some(h), Some(l)) => *o = (h * 16 + l) as u8,
            _ => return false,
        }
    }
    true
}

/// The router key of load client `i` (spread over the bytes like a real public key).
pub fn key_of(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in k.chunks_mut(8) {
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        c.copy_from_slice(&x.to_le_bytes());
    }
    k
}

/// Hex form of a router key (the hello message).
pub fn key_hex(k: &[u8; 32]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}
