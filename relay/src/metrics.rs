//! Prometheus metrics of the relay (names and meanings are listed in `docs/relay.md`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::protocol::{ErrorCode, Kind};

/// `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Message kind (text, image, ...).
    pub kind: &'static str,
}

/// `code` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Stable error code.
    pub code: &'static str,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Short reason.
    pub reason: &'static str,
}

/// `op` label (storage operation).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// Storage operation name.
    pub op: &'static str,
}

/// `op` + `error` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpErrorLabel {
    /// Storage operation name.
    pub op: &'static str,
    /// Store error label.
    pub error: &'static str,
}

/// `listener` label: the port a connection came in on.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `client` (`DCHAT_LISTEN`) or `metrics` (`DCHAT_METRICS_LISTEN`).
    pub listener: &'static str,
}

/// The values of [`ListenerLabel`].
pub const LISTENERS: [&str; 2] = ["client", "metrics"];

/// Per-kind counter handles, indexed by `Kind as usize` (the order of `Kind::ALL`).
#[derive(Default)]
struct KindCounters {
    routed: [Counter; 6],
    stored: [Counter; 6],
    delivered: [Counter; 6],
}

/// All relay metrics; cheap to clone handles are shared by every task.
pub struct Metrics {
    registry: Registry,
    /// Open client connections (authenticated or not).
    pub connections: Gauge,
    /// Authenticated sessions.
    pub sessions: Gauge,
    /// Accepted client connections since start.
    pub connections_total: Counter,
    /// Failed authentications by reason.
    pub auth_failures: Family<ReasonLabel, Counter>,
    /// Messages accepted for routing, by kind (one per send, not per recipient).
    pub routed: Family<KindLabel, Counter>,
    /// Message copies written to storage, by kind.
    pub stored: Family<KindLabel, Counter>,
    /// Message copies written to a recipient's socket, by kind.
    pub delivered: Family<KindLabel, Counter>,
    /// Duplicate sends (same sender and id) that were suppressed.
    pub duplicates: Counter,
    /// Stored messages removed by the TTL task.
    pub expired: Counter,
    /// Acknowledged messages removed.
    pub acked: Counter,
    /// Seconds from the relay receiving a message to writing it to the recipient (live
    /// pushes) or from the sender's timestamp (stored messages).
    pub delivery_latency: Histogram,
    /// Storage call latency by operation.
    pub store_latency: Family<OpLabel, Histogram>,
    /// Storage errors by operation and error.
    pub store_errors: Family<OpErrorLabel, Counter>,
    /// Frames waiting in per-connection outbound queues (sum over connections).
    pub outbound_queue_depth: Gauge,
    /// Deliveries written but not yet acknowledged (sum over connections).
    pub inflight: Gauge,
    /// Recipients whose full queue a sender waited for (backpressure).
    pub push_waits: Counter,
    /// Latest sample of the runtime's scheduling delay, seconds (load shedding signal).
    pub scheduling_delay: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Longest store of copies for behind recipients in the last sample period, seconds.
    pub behind_store_wait: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 while new sends are refused with `overloaded`.
    pub shedding: Gauge,
    /// Of those, recipients whose queue stayed full for the whole push wait, so the
    /// message was stored for them.
    pub push_wait_timeouts: Counter,
    /// Bytes of client frames received.
    pub bytes_in: Counter,
    /// Bytes of frames sent to clients.
    pub bytes_out: Counter,
    /// Rejected frames / errors sent, by error code.
    pub rejected: Family<CodeLabel, Counter>,
    /// Connections closed by the relay, by error code.
    pub closed: Family<CodeLabel, Counter>,
    /// Connected outgoing peer links.
    pub peer_links: Gauge,
    /// Handles on the per-kind series of `routed`, `stored` and `delivered`, so the
    /// message path increments a counter directly instead of hashing a label set and
    /// taking the family's lock for every message.
    by_kind: KindCounters,
    /// Accepted TCP connections that are not WebSockets (waiting for their request or
    /// serving plain HTTP), by listener.
    pub handshake_connections: Family<ListenerLabel, Gauge>,
    /// Connections closed because their first request head did not arrive in time, by
    /// listener.
    pub handshake_timeouts: Family<ListenerLabel, Counter>,
    /// Connections waiting for a request closed to make room for a new one, by listener.
    pub handshakes_evicted: Family<ListenerLabel, Counter>,
    /// New connections closed at once because every handshake place was serving a
    /// request, by listener.
    pub handshakes_rejected: Family<ListenerLabel, Counter>,
    /// Wake notices sent to peers.
    pub peer_wakes_sent: Counter,
    /// Wake notices received from peers.
    pub peer_wakes_received: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `dchat` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dchat");
        let m = Metrics {
            connections: Gauge::default(),
            sessions: Gauge::default(),
            connections_total: Counter::default(),
            auth_failures: Family::default(),
            routed: Family::default(),
            stored: Family::default(),
            delivered: Family::default(),
            duplicates: Counter::default(),
            push_waits: Counter::default(),
            scheduling_delay: Gauge::default(),
            behind_store_wait: Gauge::default(),
            shedding: Gauge::default(),
            push_wait_timeouts: Counter::default(),
            expired: Counter::default(),
            acked: Counter::default(),
            // 50 µs .. ~3.3 s
            delivery_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 17)),
            store_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
            }),
            store_errors: Family::default(),
            outbound_queue_depth: Gauge::default(),
            inflight: Gauge::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            rejected: Family::default(),
            by_kind: KindCounters::default(),
            closed: Family::default(),
            peer_links: Gauge::default(),
            handshake_connections: Family::default(),
            handshake_timeouts: Family::default(),
            handshakes_evicted: Family::default(),
            handshakes_rejected: Family::default(),
            peer_wakes_sent: Counter::default(),
            peer_wakes_received: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register("sessions", "Authenticated sessions", m.sessions.clone());
        r.register(
            "connections_accepted",
            "Accepted client connections",
            m.connections_total.clone(),
        );
        r.register(
            "auth_failures",
            "Failed authentications by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "messages_routed",
            "Messages accepted for routing by kind",
            m.routed.clone(),
        );
        r.register(
            "messages_stored",
            "Message copies stored durably by kind",
            m.stored.clone(),
        );
        r.register(
            "messages_delivered",
            "Message copies written to recipients by kind",
            m.delivered.clone(),
        );
        r.register(
            "messages_duplicate",
            "Duplicate sends suppressed",
            m.duplicates.clone(),
        );
        r.register(
            "push_waits",
            "Full recipient queues a sender waited for (backpressure)",
            m.push_waits.clone(),
        );
        r.register(
            "scheduling_delay_seconds",
            "Latest sample of how late a task of the relay runs (load shedding signal)",
            m.scheduling_delay.clone(),
        );
        r.register(
            "behind_store_wait_seconds",
            "Longest store of copies for connected recipients that fell behind, in the last load sample (load shedding signal)",
            m.behind_store_wait.clone(),
        );
        r.register(
            "overload_shedding",
            "1 while new sends are refused with overloaded",
            m.shedding.clone(),
        );
        r.register(
            "push_wait_timeouts",
            "Full recipient queues waited for in vain; the message was stored instead",
            m.push_wait_timeouts.clone(),
        );
        r.register(
            "messages_expired",
            "Stored messages removed by TTL",
            m.expired.clone(),
        );
        r.register(
            "messages_acked",
            "Stored or in-flight messages acknowledged",
            m.acked.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Relay receive (or sender timestamp for stored) to socket write",
            m.delivery_latency.clone(),
        );
        r.register(
            "store_operation_seconds",
            "Storage call latency by operation",
            m.store_latency.clone(),
        );
        r.register(
            "store_errors",
            "Storage errors by operation and error",
            m.store_errors.clone(),
        );
        r.register(
            "outbound_queue_depth",
            "Frames queued for client sockets",
            m.outbound_queue_depth.clone(),
        );
        r.register(
            "inflight_deliveries",
            "Deliveries awaiting acknowledgement",
            m.inflight.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes of client frames received",
            m.bytes_in.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes of frames sent to clients",
            m.bytes_out.clone(),
        );
        r.register(
            "rejected_frames",
            "Error frames sent by error code",
            m.rejected.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed by the relay by code",
            m.closed.clone(),
        );
        r.register(
            "peer_links",
            "Connected outgoing peer links",
            m.peer_links.clone(),
        );
        r.register(
            "handshake_connections",
            "Accepted connections that are not WebSockets (waiting for a request or plain HTTP) by listener",
            m.handshake_connections.clone(),
        );
        r.register(
            "handshake_timeouts",
            "Connections closed because their first request head was not complete within DCHAT_HANDSHAKE_TIMEOUT by listener",
            m.handshake_timeouts.clone(),
        );
        r.register(
            "handshakes_evicted",
            "Connections waiting for a request closed to make room for a new connection (DCHAT_MAX_HANDSHAKES reached) by listener",
            m.handshakes_evicted.clone(),
        );
        r.register(
            "handshakes_rejected",
            "New connections closed at once because every handshake place was serving a request by listener",
            m.handshakes_rejected.clone(),
        );
        r.register(
            "peer_wakes_sent",
            "Wake notices sent to peers",
            m.peer_wakes_sent.clone(),
        );
        r.register(
            "peer_wakes_received",
            "Wake notices received from peers",
            m.peer_wakes_received.clone(),
        );
        // Pre-create label sets so dashboards see zeros instead of missing series.
        for k in Kind::ALL {
            let l = KindLabel { kind: k.as_str() };
            let _ = m.routed.get_or_create(&l);
            let _ = m.stored.get_or_create(&l);
            let _ = m.delivered.get_or_create(&l);
        }
        for reason in ["bad_signature", "timeout"] {
            let _ = m.auth_failures.get_or_create(&ReasonLabel { reason });
        }
        for listener in LISTENERS {
            let l = ListenerLabel { listener };
            let _ = m.handshake_connections.get_or_create(&l);
            let _ = m.handshake_timeouts.get_or_create(&l);
            let _ = m.handshakes_evicted.get_or_create(&l);
            let _ = m.handshakes_rejected.get_or_create(&l);
        }
        for c in ErrorCode::ALL {
            let _ = m.rejected.get_or_create(&CodeLabel { code: c.as_str() });
        }
        let series = |f: &Family<KindLabel, Counter>| {
            Kind::ALL.map(|k| f.get_or_create(&KindLabel { kind: k.as_str() }).clone())
        };
        let by_kind = KindCounters {
            routed: series(&m.routed),
            stored: series(&m.stored),
            delivered: series(&m.delivered),
        };
        Metrics {
            registry,
            by_kind,
            ..m
        }
    }

    /// The `routed` counter of `kind`.
    pub fn routed_kind(&self, kind: Kind) -> &Counter {
        &self.by_kind.routed[kind as usize]
    }

    /// The `stored` counter of `kind`.
    pub fn stored_kind(&self, kind: Kind) -> &Counter {
        &self.by_kind.stored[kind as usize]
    }

    /// The `delivered` counter of `kind`.
    pub fn delivered_kind(&self, kind: Kind) -> &Counter {
        &self.by_kind.delivered[kind as usize]
    }

    /// Counts an error frame sent with `code`.
    pub fn reject(&self, code: ErrorCode) {
        self.rejected
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// Counts a relay-initiated close with `code`.
    pub fn close(&self, code: ErrorCode) {
        self.closed
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_handles_increment_the_exported_series() {
        let m = Metrics::new();
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i, "Kind::ALL must follow declaration order");
        }
        m.routed_kind(Kind::Image).inc();
        m.delivered_kind(Kind::Sticker).inc_by(2);
        m.stored_kind(Kind::Text).inc_by(3);
        let text = m.encode();
        assert!(
            text.contains("dchat_messages_routed_total{kind=\"image\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("dchat_messages_delivered_total{kind=\"sticker\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("dchat_messages_stored_total{kind=\"text\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("dchat_messages_routed_total{kind=\"text\"} 0\n"),
            "{text}"
        );
    }
}
