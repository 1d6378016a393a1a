//! The backup data path with the real `dchat` binary against real relays (embedded and
//! PostgreSQL) and a real AWS API emulator (moto: S3 and RDS), as the operator's Jobs run
//! it: `dchat backup create|list|verify|restore|delete`.
//!
//! Relays run in-process on 127.0.0.1:0 (their admin API on the metrics port); the CLI
//! is the built `dchat` binary. moto comes from `scripts/with-moto.sh` or is started
//! privately (tests/support/moto.rs); PostgreSQL likewise (tests/support/postgres.rs).

#[path = "support/moto.rs"]
mod moto;
#[path = "support/postgres.rs"]
mod pg_support;
#[path = "support/relay.rs"]
mod relay_support;
#[path = "support/tempdir.rs"]
mod tempdir;

use std::collections::BTreeSet;
use std::time::Duration;

use dchat_relay::client::{generate_key, public_key, Client, ClientError};
use dchat_relay::protocol::{Envelope, Kind, SendStatus};
use dchat_relay::store::PostgresConfig;
use ed25519_dalek::SigningKey;
use relay_support::{http, start, TestRelay};
use sha2::{Digest, Sha256};
use tempdir::TempDir;
use tokio::io::AsyncBufReadExt;

const TOKEN: &str = "backup-admin-token-0123456789";
const PREFIX: &str = "backups";

// ---------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------

/// What one `dchat backup …` run left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    /// The Kubernetes termination message it wrote.
    termination: String,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    fn termination_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.termination)
            .unwrap_or_else(|e| panic!("termination message is not JSON ({e}): {self:?}"))
    }

    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "dchat failed: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        self
    }

    fn failed(self) -> Run {
        assert_eq!(self.code, 1, "dchat should fail with exit 1: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        self
    }
}

/// Runs `dchat backup ARGS` with the emulator's environment plus `env`.
async fn dchat(args: &[String], env: &[(&str, String)]) -> Run {
    let dir = TempDir::new("backup-cli");
    let termination = dir.path().join("termination-log");
    std::fs::write(&termination, b"").unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dchat"));
    cmd.arg("backup")
        .args(args)
        .env("DCHAT_TERMINATION_LOG", &termination)
        .env("DCHAT_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        // scripts/with-postgres.sh exports DB_* for the whole test run; a command that
        // reads PostgreSQL gets its database explicitly.
        .env_remove("DB_HOST");
    for (k, v) in moto::env().iter().chain(env) {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("run dchat");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        termination: std::fs::read_to_string(&termination).unwrap_or_default(),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The S3 flags of `bucket` on the emulator.
fn s3(bucket: &str) -> Vec<String> {
    s3_under(bucket, PREFIX)
}

/// The S3 flags of `bucket` with another key prefix.
fn s3_under(bucket: &str, prefix: &str) -> Vec<String> {
    strings(&[
        "--s3-bucket",
        bucket,
        "--s3-prefix",
        prefix,
        "--s3-region",
        moto::REGION,
        "--s3-endpoint",
        moto::endpoint(),
        "--s3-force-path-style",
    ])
}

fn admin(r: &TestRelay) -> String {
    format!("http://{}", r.relay.metrics_addr)
}

/// `DB_*` of a PostgreSQL database.
fn db_env(pg: &PostgresConfig) -> Vec<(&'static str, String)> {
    vec![
        ("DB_HOST", pg.host.clone()),
        ("DB_PORT", pg.port.to_string()),
        ("DB_NAME", pg.dbname.clone()),
        ("DB_USER", pg.user.clone()),
        ("DB_PASSWORD", pg.password.clone()),
    ]
}

enum Src<'a> {
    Embedded(&'a TestRelay),
    Postgres(&'a PostgresConfig),
}

/// `create` of `ns/cluster/backup` from `src`, with extra flags.
async fn create(bucket: &str, path: &str, src: Src<'_>, extra: &[&str]) -> Run {
    let [ns, cluster, backup] = path.split('/').collect::<Vec<_>>()[..] else {
        panic!("bad path {path}");
    };
    let mut args = strings(&["create"]);
    args.extend(s3(bucket));
    args.extend(strings(&[
        "--namespace",
        ns,
        "--cluster",
        cluster,
        "--cluster-uid",
        "7d0c1f4e-uid",
        "--backup",
        backup,
        "--relay-version",
        "1.4.2",
    ]));
    let env = match src {
        Src::Embedded(r) => {
            args.extend(strings(&["--source", "embedded", "--admin-url", &admin(r)]));
            vec![]
        }
        Src::Postgres(pg) => {
            args.extend(strings(&["--source", "postgres"]));
            db_env(pg)
        }
    };
    args.extend(strings(extra));
    dchat(&args, &env).await
}

/// `restore` of `path` into `target`.
async fn restore(bucket: &str, path: &str, target: Src<'_>) -> Run {
    let mut args = strings(&["restore"]);
    args.extend(s3(bucket));
    args.extend(strings(&["--backup-path", path]));
    let env = match target {
        Src::Embedded(r) => {
            args.extend(strings(&["--target", "embedded", "--admin-url", &admin(r)]));
            vec![]
        }
        Src::Postgres(pg) => {
            args.extend(strings(&["--target", "postgres"]));
            db_env(pg)
        }
    };
    dchat(&args, &env).await
}

async fn verify(bucket: &str, path: &str) -> Run {
    let mut args = strings(&["verify"]);
    args.extend(s3(bucket));
    args.extend(strings(&["--backup-path", path]));
    dchat(&args, &[]).await
}

async fn delete(bucket: &str, path: &str, extra: &[&str]) -> Run {
    let mut args = strings(&["delete"]);
    args.extend(s3(bucket));
    args.extend(strings(&["--backup-path", path]));
    args.extend(strings(extra));
    dchat(&args, &[]).await
}

// ---------------------------------------------------------------------------------------
// Relay traffic
// ---------------------------------------------------------------------------------------

async fn relay() -> TestRelay {
    start(|c| c.admin_token = Some(TOKEN.into())).await
}

async fn pg_relay(pg: &PostgresConfig) -> TestRelay {
    let pg = pg.clone();
    start(move |c| {
        c.admin_token = Some(TOKEN.into());
        c.storage = pg_support::relay_storage(&pg);
    })
    .await
}

/// What a scenario stored: messages still pending for `recipient`, and envelopes the
/// recipient already acknowledged (their ids are tombstones in the store).
struct Traffic {
    sender: SigningKey,
    recipient: SigningKey,
    pending: Vec<Envelope>,
    acked: Vec<Envelope>,
}

/// Stores `n` messages for an offline recipient (plus 3 it received and acknowledged),
/// a profile and a channel membership.
async fn traffic(relay: &TestRelay, n: usize) -> Traffic {
    let sender = generate_key().unwrap();
    let recipient = generate_key().unwrap();
    let to = public_key(&recipient);
    let mut s = relay.client_as(&sender).await;
    s.publish_profile("backup sender", None, 1_000)
        .await
        .unwrap();
    let mut envs = Vec::new();
    for i in 0..n + 3 {
        let env = s.envelope_to(to, Kind::Text, format!("m-{i}").into_bytes());
        let r = s.send(env.clone()).await.unwrap();
        assert_eq!(r.status, SendStatus::Stored);
        envs.push(env);
    }
    s.close().await;
    // The recipient comes online, joins a channel, acknowledges the first three and
    // goes away again; the rest stay pending.
    let mut r = relay.client_as(&recipient).await;
    r.join("ops").await.unwrap();
    let got = drain(&mut r).await;
    assert_eq!(got.len(), n + 3);
    let first: Vec<_> = got
        .iter()
        .filter(|d| envs[..3].iter().any(|e| e.id == d.envelope.id))
        .map(|d| d.ack_ref())
        .collect();
    assert_eq!(first.len(), 3);
    assert_eq!(r.ack(first).await.unwrap(), 3);
    r.close().await;
    let acked = envs.drain(..3).collect();
    Traffic {
        sender,
        recipient,
        pending: envs,
        acked,
    }
}

/// Every delivery until the relay has nothing more for a while.
async fn drain(c: &mut Client) -> Vec<dchat_relay::client::Delivery> {
    c.set_timeout(Duration::from_millis(1500));
    let mut out = Vec::new();
    loop {
        match c.next_delivery().await {
            Ok(d) => out.push(d),
            Err(ClientError::Timeout(_)) => return out,
            Err(e) => panic!("delivery: {e}"),
        }
    }
}

/// The restored relay delivers every pending message exactly once, acknowledged ones
/// never, and a sender's retry of any of them is a duplicate.
async fn delivers_exactly_once(relay: &TestRelay, t: &Traffic) {
    let mut r = relay.client_as(&t.recipient).await;
    let got = drain(&mut r).await;
    let ids: Vec<String> = got.iter().map(|d| d.envelope.id.clone()).collect();
    let unique: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "a message was delivered twice");
    let want: BTreeSet<_> = t.pending.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        unique, want,
        "restored deliveries differ from what was pending"
    );
    // Same order as stored (seqs kept).
    let in_order: Vec<_> = t.pending.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, in_order);
    let refs = got.iter().map(|d| d.ack_ref()).collect();
    assert_eq!(r.ack(refs).await.unwrap(), t.pending.len() as u64);
    r.close().await;
    let mut r = relay.client_as(&t.recipient).await;
    assert!(drain(&mut r).await.is_empty(), "delivered again after ack");
    r.close().await;
    // While the recipient is offline, retries of acknowledged messages (before the
    // backup, and after the restore) are duplicates: the dedup entries came along. (A
    // retry to a recipient who is online is pushed live; which sends are duplicates
    // then is the relays' business, not the store's.)
    let mut s = relay.client_as(&t.sender).await;
    for env in [&t.acked[0], &t.pending[0]] {
        let r = s.send(env.clone()).await.unwrap();
        assert_eq!(
            r.status,
            SendStatus::Duplicate,
            "retry of {} after restore",
            env.id
        );
    }
    let mut r = relay.client_as(&t.recipient).await;
    assert!(drain(&mut r).await.is_empty(), "a retry was delivered");
    // The profile came along.
    let profile = r.get_profile(public_key(&t.sender)).await.unwrap();
    assert_eq!(profile.unwrap().doc.name, "backup sender");
}

fn assert_manifest(m: &serde_json::Value, path: &str, kind: &str, n: usize, bucket: &str) {
    let [ns, cluster, backup] = path.split('/').collect::<Vec<_>>()[..] else {
        panic!("bad path {path}");
    };
    assert_eq!(m["formatVersion"], 1);
    assert_eq!(m["namespace"], ns);
    assert_eq!(m["cluster"], cluster);
    assert_eq!(m["backup"], backup);
    assert_eq!(m["clusterUid"], "7d0c1f4e-uid");
    assert_eq!(m["relayVersion"], "1.4.2");
    assert_eq!(m["storeKind"], kind);
    assert_eq!(m["counts"]["messages"], n as u64);
    assert_eq!(m["counts"]["tombstones"], 3);
    assert_eq!(m["counts"]["profiles"], 1);
    assert_eq!(m["counts"]["memberships"], 1);
    assert_eq!(
        m["location"],
        format!("s3://{bucket}/{PREFIX}/{path}/data.dchat")
    );
    let created = m["createdAt"].as_str().unwrap();
    assert!(created.len() == 20 && created.ends_with('Z'), "{created}");
}

/// The bytes of an object.
async fn object(bucket: &str, key: &str) -> Option<Vec<u8>> {
    let out = moto::s3()
        .await
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .ok()?;
    Some(out.body.collect().await.unwrap().into_bytes().to_vec())
}

/// Open multipart uploads of `key`.
async fn open_uploads(bucket: &str, key: &str) -> usize {
    let out = moto::s3()
        .await
        .list_multipart_uploads()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap();
    out.uploads()
        .iter()
        .filter(|u| u.key() == Some(key))
        .count()
}

async fn admin_stats(r: &TestRelay) -> serde_json::Value {
    let resp = http(
        r.relay.metrics_addr,
        "GET",
        "/admin/stats",
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    serde_json::from_slice(&resp.body).unwrap()
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn embedded_backup_restores_into_a_new_relay_exactly_once() {
    let bucket = moto::fresh_bucket().await;
    let old = relay().await;
    let t = traffic(&old, 40).await;

    let run = create(&bucket, "prod/chat/b1", Src::Embedded(&old), &[])
        .await
        .ok();
    let m = run.json();
    assert_manifest(&m, "prod/chat/b1", "embedded", 40, &bucket);
    assert!(m.get("rdsSnapshotIdentifier").is_none());
    // The same manifest is the termination message and the object in the bucket.
    assert_eq!(run.termination_json(), m);
    let stored = object(&bucket, &format!("{PREFIX}/prod/chat/b1/manifest.json"))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stored).unwrap(),
        m
    );
    // sha256 and size are the data object's.
    let data = object(&bucket, &format!("{PREFIX}/prod/chat/b1/data.dchat"))
        .await
        .unwrap();
    assert_eq!(m["sizeBytes"], data.len() as u64);
    assert_eq!(m["sha256"], hex::encode(Sha256::digest(&data)));
    assert_eq!(
        open_uploads(&bucket, &format!("{PREFIX}/prod/chat/b1/data.dchat")).await,
        0
    );

    // A new, empty relay restored from it.
    let new = relay().await;
    let run = restore(&bucket, "prod/chat/b1", Src::Embedded(&new))
        .await
        .ok();
    let report = run.json();
    assert_eq!(report["backup"], "prod/chat/b1");
    assert_eq!(report["target"], "embedded");
    assert_eq!(report["counts"], m["counts"]);
    assert_eq!(report["sha256"], m["sha256"]);
    assert_eq!(run.termination_json(), report);
    delivers_exactly_once(&new, &t).await;

    // Restoring into a relay that holds data is refused, naming what is there.
    let run = restore(&bucket, "prod/chat/b1", Src::Embedded(&new))
        .await
        .failed();
    assert!(run.stderr.contains("is not empty"), "{run:?}");
    assert!(
        run.stderr
            .contains("inbox entries (messages or dedup), profiles, channel memberships"),
        "{run:?}"
    );
    let e = run.termination_json();
    assert_eq!(e["reason"], "TargetNotEmpty");
    assert!(e["error"].as_str().unwrap().contains("is not empty"));
    // A relay whose only data is the dedup entry of an acknowledged message (its
    // counts are all zero) is refused as well: its stats name what it holds.
    let used = relay().await;
    let rcpt = generate_key().unwrap();
    let mut s = used.client().await;
    s.send_text(public_key(&rcpt), "hi").await.unwrap();
    let mut r = used.client_as(&rcpt).await;
    let d = drain(&mut r).await;
    assert_eq!(r.ack(vec![d[0].ack_ref()]).await.unwrap(), 1);
    let stats = admin_stats(&used).await;
    assert_eq!(stats["store"]["pending_messages"], 0);
    assert_eq!(stats["contents"], "inbox entries (messages or dedup)");
    let run = restore(&bucket, "prod/chat/b1", Src::Embedded(&used))
        .await
        .failed();
    assert!(run.stderr.contains("inbox entries"), "{run:?}");
    assert_eq!(run.termination_json()["reason"], "TargetNotEmpty");

    // A second create of the same backup name is refused; the backup is unchanged.
    let run = create(&bucket, "prod/chat/b1", Src::Embedded(&old), &[])
        .await
        .failed();
    assert_eq!(run.termination_json()["reason"], "AlreadyExists");
}

#[tokio::test]
async fn postgres_backup_restores_into_an_empty_database_exactly_once() {
    let bucket = moto::fresh_bucket().await;
    let db = pg_support::fresh_database(4).await;
    let old = pg_relay(&db).await;
    let t = traffic(&old, 40).await;

    let run = create(&bucket, "prod/pg/b1", Src::Postgres(&db), &[])
        .await
        .ok();
    let m = run.json();
    assert_manifest(&m, "prod/pg/b1", "postgres", 40, &bucket);

    // Into another, empty database (the restore creates the relay's tables).
    let fresh = pg_support::fresh_database(4).await;
    let run = restore(&bucket, "prod/pg/b1", Src::Postgres(&fresh))
        .await
        .ok();
    assert_eq!(run.json()["target"], "postgres");
    assert_eq!(run.json()["counts"], m["counts"]);
    let new = pg_relay(&fresh).await;
    delivers_exactly_once(&new, &t).await;
    // On PostgreSQL the relays share which sends were accepted (`sent_ids`): a retry of
    // a restored message is a duplicate even while its recipient is online.
    let mut online = new.client_as(&t.recipient).await;
    let mut s = new.client_as(&t.sender).await;
    let r = s.send(t.acked[1].clone()).await.unwrap();
    assert_eq!(r.status, SendStatus::Duplicate);
    assert!(
        drain(&mut online).await.is_empty(),
        "a retry was delivered live"
    );

    // New messages after the restore get higher seqs than everything restored.
    online.close().await;
    let before: i64 = pg_support::admin_client(&fresh.dbname)
        .await
        .query_one("SELECT max(seq) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    let r = s
        .send_text(public_key(&t.recipient), "after")
        .await
        .unwrap();
    assert_eq!(r.status, SendStatus::Stored);
    assert!(
        r.seq.unwrap() as i64 > before,
        "seq {:?} after restore, max before {before}",
        r.seq
    );

    // Restoring into a database that holds data is refused, naming what is there, and
    // changes nothing.
    let run = restore(&bucket, "prod/pg/b1", Src::Postgres(&fresh))
        .await
        .failed();
    assert!(run.stderr.contains("is not empty"), "{run:?}");
    assert!(run.stderr.contains("messages"), "{run:?}");
    assert_eq!(run.termination_json()["reason"], "TargetNotEmpty");
}

#[tokio::test]
async fn backups_restore_across_backends() {
    let bucket = moto::fresh_bucket().await;
    let embedded = relay().await;
    let t = traffic(&embedded, 25).await;
    let e = create(
        &bucket,
        "prod/x/from-embedded",
        Src::Embedded(&embedded),
        &[],
    )
    .await
    .ok()
    .json();

    // Embedded → PostgreSQL.
    let db = pg_support::fresh_database(4).await;
    restore(&bucket, "prod/x/from-embedded", Src::Postgres(&db))
        .await
        .ok();
    // The same content gives the same bytes from either backend: a backup of the
    // restored database is byte for byte the embedded one.
    let p = create(&bucket, "prod/x/from-postgres", Src::Postgres(&db), &[])
        .await
        .ok()
        .json();
    assert_eq!(p["storeKind"], "postgres");
    assert_eq!(p["sha256"], e["sha256"]);
    assert_eq!(p["counts"], e["counts"]);

    // PostgreSQL → embedded.
    let back = relay().await;
    let run = restore(&bucket, "prod/x/from-postgres", Src::Embedded(&back))
        .await
        .ok();
    assert_eq!(run.json()["source"], "postgres");
    delivers_exactly_once(&back, &t).await;

    let on_pg = pg_relay(&db).await;
    delivers_exactly_once(&on_pg, &t).await;
}

#[tokio::test]
async fn verify_passes_and_a_corrupted_object_is_refused_naming_the_checksum() {
    let bucket = moto::fresh_bucket().await;
    let source = relay().await;
    traffic(&source, 10).await;
    let m = create(&bucket, "prod/v/b1", Src::Embedded(&source), &[])
        .await
        .ok()
        .json();

    let run = verify(&bucket, "prod/v/b1").await.ok();
    let report = run.json();
    assert_eq!(report["backup"], "prod/v/b1");
    assert_eq!(report["ok"], true);
    assert_eq!(report["counts"], m["counts"]);
    assert!(report["restoreSeconds"].as_f64().unwrap() > 0.0);
    assert!(report.get("error").is_none());
    assert_eq!(run.termination_json(), report);

    // One flipped byte in the middle of the object, same size.
    let key = format!("{PREFIX}/prod/v/b1/data.dchat");
    let mut data = object(&bucket, &key).await.unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x01;
    moto::s3()
        .await
        .put_object()
        .bucket(&bucket)
        .key(&key)
        .body(data.into())
        .send()
        .await
        .unwrap();

    let run = verify(&bucket, "prod/v/b1").await.failed();
    let report = run.json();
    assert_eq!(report["ok"], false);
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("checksum") || error.contains("sha256"),
        "{error}"
    );
    assert_eq!(report["reason"], "ChecksumMismatch");
    assert_eq!(run.termination_json(), report);

    // A restore refuses it and leaves the target empty: embedded…
    let target = relay().await;
    let run = restore(&bucket, "prod/v/b1", Src::Embedded(&target))
        .await
        .failed();
    assert!(run.stderr.contains("checksum"), "{run:?}");
    assert_eq!(run.termination_json()["reason"], "ChecksumMismatch");
    let stats = admin_stats(&target).await;
    assert_eq!(stats["store"]["pending_messages"], 0, "{stats}");
    assert_eq!(stats["store"]["profiles"], 0, "{stats}");
    // …and PostgreSQL.
    let db = pg_support::fresh_database(2).await;
    let run = restore(&bucket, "prod/v/b1", Src::Postgres(&db))
        .await
        .failed();
    assert!(run.stderr.contains("checksum"), "{run:?}");
    let n: i64 = pg_support::admin_client(&db.dbname)
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM profiles)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // A manifest whose sha256 does not match the (intact) object is refused too.
    let m2 = create(&bucket, "prod/v/b2", Src::Embedded(&source), &[])
        .await
        .ok()
        .json();
    let mut wrong = m2.clone();
    wrong["sha256"] = serde_json::json!("0".repeat(64));
    moto::s3()
        .await
        .put_object()
        .bucket(&bucket)
        .key(format!("{PREFIX}/prod/v/b2/manifest.json"))
        .body(wrong.to_string().into_bytes().into())
        .send()
        .await
        .unwrap();
    let report = verify(&bucket, "prod/v/b2").await.failed().json();
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("sha256: the manifest says 0000"), "{error}");
}

/// Serves a relay's real snapshot on `/admin/snapshot`, but stops sending after
/// `limit` bytes and never ends the response: a `create` reading it is stuck mid-upload.
async fn stalling_admin(snapshot: Vec<u8>, limit: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = snapshot.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 4096];
                let _ = sock.read(&mut req).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body[..limit.min(body.len())]).await;
                tokio::time::sleep(Duration::from_secs(600)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_backup_killed_mid_upload_leaves_no_manifest_and_its_upload_is_aborted() {
    let bucket = moto::fresh_bucket().await;
    let source = relay().await;
    // About 10 MiB of messages: more than one 8 MiB part.
    let mut s = source.client().await;
    let to = public_key(&generate_key().unwrap());
    let payload = vec![b'x'; 150 * 1024];
    for _ in 0..70 {
        let env = s.envelope_to(to, Kind::Text, payload.clone());
        assert_eq!(s.send(env).await.unwrap().status, SendStatus::Stored);
    }
    let snap = http(
        source.relay.metrics_addr,
        "GET",
        "/admin/snapshot",
        Some(TOKEN),
        b"",
    )
    .await;
    assert_eq!(snap.status, 200);
    assert!(snap.body.len() > 9 << 20, "{} bytes", snap.body.len());
    let stall = stalling_admin(snap.body, 9 << 20).await;

    for (backup, cleanup) in [
        ("killed-then-recreated", "create"),
        ("killed-then-deleted", "delete"),
    ] {
        let path = format!("prod/k/{backup}");
        let key = format!("{PREFIX}/{path}/data.dchat");
        let mut args = strings(&["backup", "create"]);
        args.extend(s3(&bucket));
        args.extend(strings(&[
            "--namespace",
            "prod",
            "--cluster",
            "k",
            "--cluster-uid",
            "u",
            "--backup",
            backup,
            "--relay-version",
            "1.4.2",
            "--source",
            "embedded",
            "--admin-url",
            &format!("http://{stall}"),
        ]));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dchat"));
        cmd.args(&args)
            .env("DCHAT_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "dchat_relay=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in moto::env() {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        // Wait until the first part is in S3, then kill -9 (SIGKILL: no cleanup runs).
        let stderr = child.stderr.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("part uploaded") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(waited, Ok(true), "create never uploaded a part");
        assert!(
            child.try_wait().unwrap().is_none(),
            "create ended before it was killed"
        );
        child.start_kill().unwrap();
        child.wait().await.unwrap();

        // No backup: no manifest, no data object, one open upload.
        assert!(object(&bucket, &format!("{PREFIX}/{path}/manifest.json"))
            .await
            .is_none());
        assert!(object(&bucket, &key).await.is_none());
        assert_eq!(open_uploads(&bucket, &key).await, 1);
        let listed = {
            let mut a = strings(&["list"]);
            a.extend(s3(&bucket));
            dchat(&a, &[]).await.ok().stdout
        };
        assert!(!listed.contains(backup), "{listed}");

        match cleanup {
            // The next run of the same backup aborts it, then completes.
            "create" => {
                let m = create(&bucket, &path, Src::Embedded(&source), &[])
                    .await
                    .ok()
                    .json();
                assert_eq!(m["counts"]["messages"], 70);
            }
            // Or deleting the backup does.
            _ => {
                let report = delete(&bucket, &path, &[]).await.ok().json();
                assert_eq!(report["abortedUploads"], 1, "{report}");
                assert_eq!(report["dataDeleted"], false);
                assert_eq!(report["manifestDeleted"], false);
            }
        }
        assert_eq!(
            open_uploads(&bucket, &key).await,
            0,
            "{cleanup} left the upload open"
        );
    }
}

#[tokio::test]
async fn rds_snapshots_are_tagged_and_only_managed_ones_are_deleted() {
    let bucket = moto::fresh_bucket().await;
    let instance = moto::fresh_db_instance().await;
    let rds = moto::rds().await;
    let source = relay().await;
    traffic(&source, 5).await;

    let m = create(
        &bucket,
        "prod/r/b1",
        Src::Embedded(&source),
        &["--rds-instance", &instance],
    )
    .await
    .ok()
    .json();
    let id = m["rdsSnapshotIdentifier"].as_str().unwrap().to_string();
    assert!(id.starts_with("dchat-prod-r-b1-"), "{id}");
    let snap = rds
        .describe_db_snapshots()
        .db_snapshot_identifier(&id)
        .send()
        .await
        .unwrap();
    let snap = &snap.db_snapshots()[0];
    assert_eq!(snap.status(), Some("available"));
    assert_eq!(snap.snapshot_type(), Some("manual"));
    assert_eq!(snap.db_instance_identifier(), Some(instance.as_str()));
    let tags: BTreeSet<(String, String)> = snap
        .tag_list()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    for tag in [
        ("dchat.network/managed-by", "dchat-operator"),
        ("dchat.network/cluster", "prod/r"),
        ("dchat.network/backup", "b1"),
    ] {
        assert!(
            tags.contains(&(tag.0.to_string(), tag.1.to_string())),
            "{tags:?}"
        );
    }
    // list shows it with its snapshot.
    let mut a = strings(&["list", "-o", "table"]);
    a.extend(s3(&bucket));
    let table = dchat(&a, &[]).await.ok().stdout;
    assert!(table.contains("b1") && table.contains(&id), "{table}");

    assert_eq!(m["rdsRegion"], moto::REGION);
    // delete: the snapshot the manifest names first — in the region the manifest
    // recorded, whatever region the command is told — then the objects.
    let report = delete(&bucket, "prod/r/b1", &["--rds-region", "ap-southeast-2"])
        .await
        .ok()
        .json();
    assert_eq!(report["rdsSnapshots"][0]["id"], id.as_str());
    assert_eq!(report["rdsSnapshots"][0]["result"], "deleted");
    assert_eq!(report["dataDeleted"], true);
    assert_eq!(report["manifestDeleted"], true);
    assert!(rds
        .describe_db_snapshots()
        .db_snapshot_identifier(&id)
        .send()
        .await
        .is_err());
    assert!(object(&bucket, &format!("{PREFIX}/prod/r/b1/data.dchat"))
        .await
        .is_none());
    // Idempotent: deleting it again succeeds and finds everything gone.
    let report = delete(&bucket, "prod/r/b1", &["--rds-snapshot", &id])
        .await
        .ok()
        .json();
    assert_eq!(report["rdsSnapshots"][0]["result"], "gone");
    assert_eq!(report["dataDeleted"], false);

    // A snapshot someone took by hand (no tags) is refused, and nothing is deleted.
    let m2 = create(&bucket, "prod/r/b2", Src::Embedded(&source), &[])
        .await
        .ok()
        .json();
    let hand = moto::unique("hand-made");
    rds.create_db_snapshot()
        .db_instance_identifier(&instance)
        .db_snapshot_identifier(&hand)
        .send()
        .await
        .unwrap();
    let run = delete(&bucket, "prod/r/b2", &["--rds-snapshot", &hand])
        .await
        .failed();
    assert!(
        run.stderr
            .contains("dchat.network/managed-by=dchat-operator"),
        "{run:?}"
    );
    assert_eq!(run.termination_json()["reason"], "RdsSnapshotNotManaged");
    assert!(rds
        .describe_db_snapshots()
        .db_snapshot_identifier(&hand)
        .send()
        .await
        .is_ok());
    assert!(
        object(&bucket, &format!("{PREFIX}/prod/r/b2/manifest.json"))
            .await
            .is_some()
    );
    // Nor are moto's automated `rds:` snapshots of the instance ever touched.
    let automated = rds
        .describe_db_snapshots()
        .db_instance_identifier(&instance)
        .snapshot_type("automated")
        .send()
        .await
        .unwrap();
    let auto_id = automated.db_snapshots()[0]
        .db_snapshot_identifier()
        .unwrap()
        .to_string();
    assert!(auto_id.starts_with("rds:"), "{auto_id}");
    let run = delete(&bucket, "prod/r/b2", &["--rds-snapshot", &auto_id])
        .await
        .failed();
    assert!(run.stderr.contains("not a manual one"), "{run:?}");
    assert!(rds
        .describe_db_snapshots()
        .db_snapshot_identifier(&auto_id)
        .send()
        .await
        .is_ok());
    // A managed snapshot of another backup is refused as well.
    let m3 = create(
        &bucket,
        "prod/r/b3",
        Src::Embedded(&source),
        &[
            "--rds-instance",
            &instance,
            "--rds-snapshot-prefix",
            "dchat-prod-relay",
        ],
    )
    .await
    .ok()
    .json();
    // With a prefix (what an IAM policy may require of snapshot names).
    let other = m3["rdsSnapshotIdentifier"].as_str().unwrap();
    assert!(other.starts_with("dchat-prod-relay-prod-r-b3-"), "{other}");
    let run = delete(&bucket, "prod/r/b2", &["--rds-snapshot", other])
        .await
        .failed();
    assert!(run.stderr.contains("dchat.network/backup"), "{run:?}");
    assert!(rds
        .describe_db_snapshots()
        .db_snapshot_identifier(other)
        .send()
        .await
        .is_ok());
    // A refused snapshot refuses the whole delete before anything is removed, also the
    // backup's own snapshot (`dchat-…`, which sorts before `rds:…`).
    let run = delete(&bucket, "prod/r/b3", &["--rds-snapshot", &auto_id])
        .await
        .failed();
    assert_eq!(run.termination_json()["reason"], "RdsSnapshotNotManaged");
    assert!(
        rds.describe_db_snapshots()
            .db_snapshot_identifier(other)
            .send()
            .await
            .is_ok(),
        "the backup's own snapshot was deleted before the refusal"
    );
    assert!(
        object(&bucket, &format!("{PREFIX}/prod/r/b3/manifest.json"))
            .await
            .is_some()
    );
    assert_eq!(m2["storeKind"], "embedded");
}

#[tokio::test]
async fn list_shows_the_manifests() {
    let bucket = moto::fresh_bucket().await;
    let source = relay().await;
    traffic(&source, 2).await;
    for path in [
        "prod/chat/a",
        "prod/chat/b",
        "prod/other/c",
        "staging/chat/d",
    ] {
        let run = create(&bucket, path, Src::Embedded(&source), &[])
            .await
            .ok();
        // moto reports the composite SHA-256 of the parts, so that is what is compared.
        assert!(run.stderr.contains("composite-sha256"), "{run:?}");
    }
    // Reading the object back instead (what a store without checksums gets).
    let run = create(
        &bucket,
        "staging/chat/e",
        Src::Embedded(&source),
        &["--upload-check", "reread"],
    )
    .await
    .ok();
    assert!(run.stderr.contains("reread-sha256"), "{run:?}");
    // An incomplete backup (data, no manifest) and a damaged manifest are not listed.
    let s3c = moto::s3().await;
    s3c.put_object()
        .bucket(&bucket)
        .key(format!("{PREFIX}/prod/chat/partial/data.dchat"))
        .body(b"DCHATSNP".to_vec().into())
        .send()
        .await
        .unwrap();
    s3c.put_object()
        .bucket(&bucket)
        .key(format!("{PREFIX}/prod/chat/broken/manifest.json"))
        .body(b"{not json".to_vec().into())
        .send()
        .await
        .unwrap();

    let list = |extra: &'static [&'static str]| {
        let bucket = bucket.clone();
        async move {
            let mut a = strings(&["list"]);
            a.extend(s3(&bucket));
            a.extend(strings(extra));
            dchat(&a, &[]).await.ok()
        }
    };
    let run = list(&[]).await;
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|m| m["backup"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert!(run.stderr.contains("broken/manifest.json"), "{run:?}");
    let run = list(&["--namespace", "prod", "--cluster", "chat"]).await;
    assert_eq!(run.stdout.lines().count(), 2, "{run:?}");
    let run = list(&["--namespace", "staging"]).await;
    assert_eq!(run.stdout.lines().count(), 2, "{run:?}");
    let run = list(&["-o", "table"]).await;
    let mut rows = run.stdout.lines();
    assert!(rows
        .next()
        .unwrap()
        .starts_with("NAMESPACE  CLUSTER  BACKUP  CREATED"));
    assert_eq!(rows.count(), 5);
    // The bucket's other prefixes are not looked at.
    let mut a = strings(&["list"]);
    a.extend(s3_under(&bucket, "elsewhere"));
    assert_eq!(dchat(&a, &[]).await.ok().stdout, "");
}

#[tokio::test]
async fn bad_input_is_a_clear_error_never_a_panic() {
    let bucket = moto::fresh_bucket().await;
    let source = relay().await;

    // A missing flag: usage error (exit 2), still reported as the termination message.
    let run = dchat(&strings(&["create", "--s3-bucket", &bucket]), &[]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--namespace"), "{run:?}");
    let e = run.termination_json();
    assert_eq!(e["reason"], "InvalidInput");
    assert!(e["error"].as_str().unwrap().contains("required"), "{e}");

    // Names that cannot be a backup path.
    let run = create(&bucket, "prod/chat/Bad_Name", Src::Embedded(&source), &[])
        .await
        .failed();
    assert!(run.stderr.contains("--backup"), "{run:?}");
    assert_eq!(run.termination_json()["reason"], "InvalidInput");
    let mut a = strings(&["verify"]);
    a.extend(s3(&bucket));
    a.extend(strings(&["--backup-path", "prod/chat"]));
    let run = dchat(&a, &[]).await.failed();
    assert!(run.stderr.contains("--backup-path"), "{run:?}");

    // An unknown backup.
    let target = relay().await;
    let run = restore(&bucket, "prod/chat/nope", Src::Embedded(&target))
        .await
        .failed();
    assert!(
        run.stderr.contains("not found") && run.stderr.contains("manifest.json"),
        "{run:?}"
    );
    assert_eq!(run.termination_json()["reason"], "NotFound");
    let report = verify(&bucket, "prod/chat/nope").await.failed().json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["reason"], "NotFound");

    // A restore into the embedded store without its admin URL; a bucket that does not
    // exist; an unknown encryption mode; a wrong admin token.
    let mut a = strings(&["restore"]);
    a.extend(s3(&bucket));
    a.extend(strings(&[
        "--backup-path",
        "prod/chat/x",
        "--target",
        "embedded",
    ]));
    let run = dchat(&a, &[]).await.failed();
    assert!(run.stderr.contains("--admin-url"), "{run:?}");
    let run = create(
        &moto::unique("no-such-bucket"),
        "prod/chat/x",
        Src::Embedded(&source),
        &[],
    )
    .await
    .failed();
    assert!(
        run.stderr.contains("NoSuchBucket") || run.stderr.contains("does not exist"),
        "{run:?}"
    );
    // verify of a bucket that does not exist says so, not that the backup is missing.
    let run = verify(&moto::unique("no-such-bucket"), "prod/chat/x")
        .await
        .failed();
    assert_eq!(run.termination_json()["reason"], "S3Error", "{run:?}");
    assert!(run.stderr.contains("NoSuchBucket"), "{run:?}");
    let run = create(
        &bucket,
        "prod/chat/x",
        Src::Embedded(&source),
        &["--sse", "DES"],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--sse"), "{run:?}");
    // A missing required flag: the termination message names it.
    let run = dchat(&strings(&["verify", "--backup-path", "a/b/c"]), &[]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let e = run.termination_json();
    assert_eq!(e["reason"], "InvalidInput");
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("not provided") && m.contains("--s3-bucket")),
        "{run:?}"
    );
    let run = create(
        &bucket,
        "prod/chat/x",
        Src::Embedded(&source),
        &[
            "--rds-instance",
            "db",
            "--rds-snapshot-prefix",
            "bad_prefix",
        ],
    )
    .await
    .failed();
    assert!(run.stderr.contains("--rds-snapshot-prefix"), "{run:?}");
    let mut args = strings(&["create"]);
    args.extend(s3(&bucket));
    args.extend(strings(&[
        "--namespace",
        "prod",
        "--cluster",
        "chat",
        "--cluster-uid",
        "u",
        "--backup",
        "x",
        "--relay-version",
        "1",
        "--source",
        "embedded",
        "--admin-url",
        &admin(&source),
    ]));
    let run = dchat(
        &args,
        &[("DCHAT_ADMIN_TOKEN", "wrong-token-0123456789".into())],
    )
    .await
    .failed();
    assert!(run.stderr.contains("HTTP 401"), "{run:?}");
    // Nothing was left behind by the failed runs.
    assert_eq!(
        open_uploads(&bucket, &format!("{PREFIX}/prod/chat/x/data.dchat")).await,
        0
    );
    assert!(
        object(&bucket, &format!("{PREFIX}/prod/chat/x/manifest.json"))
            .await
            .is_none()
    );
}

/// Peak RSS of `dchat backup create` for a store far larger than its memory bound.
/// A benchmark rather than a timed test: run with
/// `cargo test -p dchat-relay --test backup -- --ignored --nocapture create_memory`.
#[tokio::test]
#[ignore]
async fn create_memory_stays_bounded_for_a_large_store() {
    let bucket = moto::fresh_bucket().await;
    let source = relay().await;
    let mb: usize = std::env::var("DCHAT_BACKUP_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let payload = vec![b'y'; 150 * 1024];
    let mut s = source.client().await;
    let to = public_key(&generate_key().unwrap());
    let n = mb * 1024 / 150;
    for _ in 0..n {
        let env = s.envelope_to(to, Kind::Text, payload.clone());
        s.send(env).await.unwrap();
    }
    let mut args = strings(&["backup", "create"]);
    args.extend(s3(&bucket));
    args.extend(strings(&[
        "--namespace",
        "bench",
        "--cluster",
        "c",
        "--cluster-uid",
        "u",
        "--backup",
        "big",
        "--relay-version",
        "1",
        "--source",
        "embedded",
        "--admin-url",
        &admin(&source),
    ]));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dchat"));
    cmd.args(&args)
        .env("DCHAT_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped());
    for (k, v) in moto::env() {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut peak_kb = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    peak_kb = peak_kb.max(kb);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let size = m["sizeBytes"].as_u64().unwrap();
    eprintln!(
        "backup create: {} MiB snapshot ({} messages) in {:.1} s, peak RSS {} MiB",
        size >> 20,
        m["counts"]["messages"],
        started.elapsed().as_secs_f64(),
        peak_kb / 1024
    );
    assert!(
        size > 3 * (64 << 20),
        "store too small for the check: {size} bytes"
    );
    assert!(peak_kb <= 64 * 1024, "peak RSS {peak_kb} kB > 64 MiB");
}
