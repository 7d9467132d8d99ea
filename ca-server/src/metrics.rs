//! Metrics in the Prometheus text format (version 0.0.4), served at `GET /metrics` on the admin
//! listener. Counters and histograms are updated where things happen; gauges that describe the
//! store are read when the metrics are scraped.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use protocol_spec::Problem;

/// The `Content-Type` of what [`Metrics::encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTPS enrollment.
    Https,
    /// CoAP enrollment.
    Coap,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::Coap => "coap",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    transport: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LineLabel {
    line: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminLabel {
    operation: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoapLabel {
    event: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabel {
    door: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    door: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoapStateLabel {
    kind: String,
}

/// Every metric of the CA.
pub struct Metrics {
    registry: Registry,
    /// Held while a scrape sets the gauges and encodes, so that two scrapes do not interleave.
    scrape: std::sync::Mutex<()>,
    enrollments: Family<Outcome, Counter>,
    enroll_latency: Family<TransportLabel, Histogram>,
    deliveries: Family<OutcomeLabel, Counter>,
    acks: Family<OutcomeLabel, Counter>,
    secret_latency: Family<OutcomeLabel, Histogram>,
    rotations: Counter,
    revocations: Counter,
    resets: Counter,
    batch_size: Histogram,
    sync_latency: Histogram,
    admin: Family<AdminLabel, Counter>,
    store_bytes: Gauge<i64, AtomicI64>,
    revoked: Gauge<i64, AtomicI64>,
    line_enrolled: Family<LineLabel, Gauge<i64, AtomicI64>>,
    line_quota: Family<LineLabel, Gauge<i64, AtomicI64>>,
    coap: Family<CoapLabel, Counter<u64, AtomicU64>>,
    coap_state: Family<CoapStateLabel, Gauge<i64, AtomicI64>>,
    refused_connections: Family<RefusedLabel, Counter>,
    rate_limited: Family<DoorLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 100 us to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, all zero.
    pub fn new() -> Self {
        Self::for_node(crate::audit::node())
    }

    /// Metrics whose every series carries `node="NAME"` (several CA nodes scraped into one
    /// Prometheus), or no such label.
    pub fn for_node(node: Option<&str>) -> Self {
        let mut registry = match node {
            Some(node) => Registry::with_prefix_and_labels(
                "imprint",
                [(
                    std::borrow::Cow::Borrowed("node"),
                    std::borrow::Cow::Owned(node.to_string()),
                )]
                .into_iter(),
            ),
            None => Registry::with_prefix("imprint"),
        };
        let enrollments = Family::<Outcome, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollment requests by transport and outcome (issued, existing, or the problem type)",
            enrollments.clone(),
        );
        let enroll_latency = Family::<TransportLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "enrollment_duration_seconds",
            "Time from a decoded enrollment request to its durable answer",
            enroll_latency.clone(),
        );
        let deliveries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "secret_deliveries",
            "Secret fetches over mutual TLS by outcome (delivered or the problem type)",
            deliveries.clone(),
        );
        let acks = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "secret_acks",
            "Secret acknowledgements by outcome (confirmed or the problem type)",
            acks.clone(),
        );
        let secret_latency = Family::<OutcomeLabel, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "secret_request_duration_seconds",
            "Time to answer a secret fetch or acknowledgement, durable",
            secret_latency.clone(),
        );
        let rotations = Counter::default();
        registry.register(
            "secret_rotations",
            "Secret versions created by rotation",
            rotations.clone(),
        );
        let revocations = Counter::default();
        registry.register("revocations", "Devices revoked", revocations.clone());
        let resets = Counter::default();
        registry.register(
            "resets",
            "Device serials reset for re-enrollment",
            resets.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "commit_batch_size",
            "Writes made durable together by one group commit (one fdatasync)",
            batch_size.clone(),
        );
        let sync_latency = latency_histogram();
        registry.register(
            "commit_sync_duration_seconds",
            "Time of one group commit's flush and fdatasync",
            sync_latency.clone(),
        );
        let admin = Family::<AdminLabel, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests by operation and HTTP status",
            admin.clone(),
        );
        let store_bytes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "store_size_bytes",
            "Bytes the store occupies on disk",
            store_bytes.clone(),
        );
        let revoked = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "revoked_devices",
            "Devices currently revoked",
            revoked.clone(),
        );
        let line_enrolled = Family::<LineLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "line_enrolled_devices",
            "Devices enrolled per line",
            line_enrolled.clone(),
        );
        let line_quota = Family::<LineLabel, Gauge<i64, AtomicI64>>::default();
        registry.register("line_quota_devices", "Quota per line", line_quota.clone());
        let coap = Family::<CoapLabel, Counter<u64, AtomicU64>>::default();
        registry.register("coap_events", "CoAP front-end events", coap.clone());
        let coap_state = Family::<CoapStateLabel, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "coap_state",
            "Entries the CoAP front end holds now, by kind (bounded per source and in total)",
            coap_state.clone(),
        );
        let refused_connections = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "refused_connections",
            "TCP connections closed on accept, by door and reason (source: the source address \
             holds its share of slots; listener: the door is full; rate: the source is past its \
             rate, so no TLS handshake)",
            refused_connections.clone(),
        );
        let rate_limited = Family::<DoorLabel, Counter>::default();
        registry.register(
            "source_rate_limited",
            "HTTPS requests answered 429 because their source address exceeded its rate, by door \
             (CoAP: coap_events{event=\"rate_limited\"})",
            rate_limited.clone(),
        );
        Metrics {
            registry,
            scrape: std::sync::Mutex::new(()),
            enrollments,
            enroll_latency,
            deliveries,
            acks,
            secret_latency,
            rotations,
            revocations,
            resets,
            batch_size,
            sync_latency,
            admin,
            store_bytes,
            revoked,
            line_enrolled,
            line_quota,
            coap,
            coap_state,
            refused_connections,
            rate_limited,
        }
    }

    /// An HTTPS request refused for its source's rate.
    pub fn source_rate_limited(&self, door: &str) {
        self.rate_limited
            .get_or_create(&DoorLabel {
                door: door.to_string(),
            })
            .inc();
    }

    /// A connection closed on accept, before its TLS handshake, because its source was past
    /// its rate.
    pub fn handshake_rate_limited(&self, door: &str) {
        self.refused_connections
            .get_or_create(&RefusedLabel {
                door: door.to_string(),
                reason: "rate".to_string(),
            })
            .inc();
    }

    /// A connection closed on accept for want of a slot.
    pub fn connection_refused(&self, door: &str, why: crate::limits::NoSlot) {
        let reason = match why {
            crate::limits::NoSlot::Source => "source",
            crate::limits::NoSlot::Listener => "listener",
        };
        self.refused_connections
            .get_or_create(&RefusedLabel {
                door: door.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// One enrollment answered: `created` is `Some(true)` for a new binding, `Some(false)` for
    /// a stored one returned again, `None` for a refusal with `problem`.
    pub fn enrollment(
        &self,
        transport: Transport,
        outcome: Result<bool, &Problem>,
        took: Duration,
    ) {
        let outcome = match outcome {
            Ok(true) => "issued".to_string(),
            Ok(false) => "existing".to_string(),
            Err(p) => p.kind.to_string(),
        };
        let t = transport.name().to_string();
        self.enrollments
            .get_or_create(&Outcome {
                transport: t.clone(),
                outcome,
            })
            .inc();
        self.enroll_latency
            .get_or_create(&TransportLabel { transport: t })
            .observe(took.as_secs_f64());
    }

    /// One secret fetch answered.
    pub fn delivery(&self, outcome: Result<(), &Problem>, took: Duration) {
        let outcome = outcome.map_or_else(|p| p.kind.to_string(), |()| "delivered".into());
        self.deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        self.secret_latency
            .get_or_create(&OutcomeLabel {
                outcome: "fetch".into(),
            })
            .observe(took.as_secs_f64());
    }

    /// One acknowledgement answered.
    pub fn ack(&self, outcome: Result<(), &Problem>, took: Duration) {
        let outcome = outcome.map_or_else(|p| p.kind.to_string(), |()| "confirmed".into());
        self.acks.get_or_create(&OutcomeLabel { outcome }).inc();
        self.secret_latency
            .get_or_create(&OutcomeLabel {
                outcome: "ack".into(),
            })
            .observe(took.as_secs_f64());
    }

    /// `n` versions created by rotation.
    pub fn rotated(&self, n: u64) {
        self.rotations.inc_by(n);
    }

    /// A device revoked.
    pub fn revoked(&self) {
        self.revocations.inc();
    }

    /// A serial reset.
    pub fn reset(&self) {
        self.resets.inc();
    }

    /// One group commit: how many writes it made durable and how long the sync took.
    pub fn commit(&self, batch: usize, sync: Duration) {
        self.batch_size.observe(batch as f64);
        self.sync_latency.observe(sync.as_secs_f64());
    }

    /// One admin request answered.
    pub fn admin(&self, operation: &str, status: u16) {
        self.admin
            .get_or_create(&AdminLabel {
                operation: operation.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Encodes every metric, after setting the gauges that describe the store from `snapshot`.
    pub fn encode(&self, snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.store_bytes.set(clamp(snapshot.store_bytes));
        self.revoked.set(clamp(snapshot.revoked));
        for (line, enrolled, quota) in &snapshot.lines {
            let l = LineLabel { line: line.clone() };
            self.line_enrolled.get_or_create(&l).set(clamp(*enrolled));
            self.line_quota.get_or_create(&l).set(clamp(*quota));
        }
        for (event, value) in &snapshot.coap {
            let c = self.coap.get_or_create(&CoapLabel {
                event: (*event).to_string(),
            });
            // Counters only go up; the CoAP front end's own counters are the source.
            let now = c.get();
            if *value > now {
                c.inc_by(*value - now);
            }
        }
        for (kind, value) in &snapshot.coap_state {
            self.coap_state
                .get_or_create(&CoapStateLabel {
                    kind: (*kind).to_string(),
                })
                .set(clamp(*value));
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What the gauges show, read from the store and the front ends at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Bytes on disk.
    pub store_bytes: u64,
    /// Devices revoked.
    pub revoked: u64,
    /// (line, enrolled, quota).
    pub lines: Vec<(String, u64, u64)>,
    /// CoAP counters by event name.
    pub coap: Vec<(&'static str, u64)>,
    /// Entries the CoAP front end holds, by kind.
    pub coap_state: Vec<(&'static str, u64)>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A node's metrics carry its name on every series; a process without a name has no label.
    #[test]
    fn every_series_of_a_named_node_carries_its_name() {
        let snapshot = Snapshot {
            store_bytes: 1,
            revoked: 0,
            lines: vec![("line-1".into(), 3, 10)],
            coap: vec![],
            coap_state: vec![],
        };
        let named = Metrics::for_node(Some("node-a"));
        named.rotated(1);
        let text = named.encode(&snapshot).unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert!(series.len() > 5, "{text}");
        for l in series {
            assert!(l.contains("node=\"node-a\""), "{l}");
        }
        let plain = Metrics::for_node(None).encode(&snapshot).unwrap();
        assert!(!plain.contains("node="), "{plain}");
    }
}
