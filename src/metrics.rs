//! Prometheus metrics for `GET /metrics`, every name prefixed `stompgate_`.
//!
//! Each gateway owns its registry (no process-global state), so several
//! gateways in one test process count separately. Labels only take values
//! from fixed sets: STOMP commands, versions, ERROR reasons.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// WebSocket connections open, before and after CONNECT.
    pub connections_open: IntGauge,
    /// Connected STOMP sessions, by negotiated version.
    pub sessions: IntGaugeVec,
    pub subscriptions: IntGauge,
    pub frames_received: IntCounterVec,
    pub frames_sent: IntCounterVec,
    /// SENDs the broker confirmed (routed or not).
    pub messages_published: IntCounter,
    /// Confirmed SENDs that no queue took (`routed:false`).
    pub messages_unroutable: IntCounter,
    pub publish_confirm_seconds: Histogram,
    /// Messages taken from session queues.
    pub deliveries: IntCounter,
    /// MESSAGE frames written to clients (one per matching subscription).
    pub messages_delivered: IntCounter,
    /// Deliveries acked back to RabbitMQ.
    pub deliveries_acked: IntCounter,
    /// Deliveries returned to their queue by a client's NACK.
    pub deliveries_requeued: IntCounter,
    /// Sessions moved from unacknowledged consumption to acks and a
    /// prefetch, by why: `client_ack`, `backlog`, `slow_socket` or
    /// `large_message`.
    pub acked_consumption: IntCounterVec,
    pub errors: IntCounterVec,
    /// Refusals by the config key of the limit or rule that refused.
    pub refusals: IntCounterVec,
    /// Presence messages this node published, by kind: `beat`, `bye`,
    /// `query`, `unwatch`, `answer`, `join`, `leave`.
    pub presence_published: IntCounterVec,
    /// 1 when `/readyz` answers 200 (set at each scrape), else 0.
    pub ready: IntGauge,
    /// Presence nodes heard from and not timed out (this one too).
    pub presence_nodes: IntGauge,
    /// Times joins and leaves came faster than the node could publish
    /// them (past presence.max_outbox), and watching nodes asked again.
    pub presence_outbox_overflows: IntCounter,
    pub heartbeat_timeouts: IntCounter,
    pub slow_client_disconnects: IntCounter,
    /// 1 while the broker answers, 0 otherwise.
    pub broker_up: IntGauge,
    /// AMQP connections opened.
    pub broker_connections_opened: IntCounter,
    /// Connections opened after the broker had been lost.
    pub broker_reconnects: IntCounter,
    /// Sessions whose queue was restored after a broker outage.
    pub sessions_recovered: IntCounter,
    /// 1 while the broker blocks publishing on a connection (a resource
    /// alarm), 0 otherwise.
    pub broker_blocked: IntGauge,
    /// Attempts to open an AMQP connection that failed.
    pub broker_connect_failures: IntCounter,
    /// Deliveries with strings that were not UTF-8, delivered without them.
    pub broker_lenient_deliveries: IntCounter,
    /// SENDs the broker refused to take (`basic.nack`).
    pub messages_nacked: IntCounter,
    /// Bytes held for clients, by what: `deliveries` on their way to
    /// clients, `inbound` frames clients began and transactions they hold.
    pub held_bytes: IntGaugeVec,
}

/// Every ERROR `message` the gateway sends: `errors_total{reason}` shows
/// each at 0 from the start (debug builds check that nothing else is
/// counted).
pub const ERROR_REASONS: [&str; 23] = [
    "access refused",
    "broker error",
    "broker unavailable",
    "connect timeout",
    "frame timeout",
    "frame too large",
    "header too long",
    "heart-beat timeout",
    "invalid destination",
    "invalid header",
    "limit exceeded",
    "malformed frame",
    "missing header",
    "protocol error",
    "server shutting down",
    "slow consumer",
    "token expired",
    "too many connections",
    "too many headers",
    "try again later",
    "undefined escape sequence",
    "unexpected body",
    "unknown command",
];

/// Every limit or rule a refusal names in `refusals_total{limit}`, shown
/// at 0 from the start (debug builds check that nothing else is counted).
pub const REFUSAL_LIMITS: [&str; 24] = [
    "auth",
    "auth.failed_login_limit",
    "auth.max_pending_logins",
    "auth.users",
    "amqp.allowed_exchanges",
    "amqp.direct_exchange",
    "amqp.node_prefetch_bytes",
    "amqp.prefetch_bytes",
    "presence.enabled",
    "presence.max_pending",
    "server.max_connections",
    "server.max_connections_per_ip",
    "server.max_message_bytes",
    "stomp.connect_timeout",
    "stomp.frame_timeout",
    "stomp.max_frame_bytes",
    "stomp.max_header_bytes",
    "stomp.max_headers",
    "stomp.max_subscriptions",
    "stomp.max_transaction_bytes",
    "stomp.max_transaction_frames",
    "stomp.max_transactions",
    "stomp.node_inbound_bytes",
    "stomp.slow_client_timeout",
];

/// Why sessions move to acked consumption (`acked_consumption_total`).
pub const ACKED_REASONS: [&str; 4] = ["client_ack", "backlog", "slow_socket", "large_message"];

/// What presence publishes (`presence_published_total{op}`).
pub const PRESENCE_OPS: [&str; 7] = ["beat", "bye", "query", "unwatch", "answer", "join", "leave"];

/// `frames_received_total{command}`: what a client sends, and OTHER for
/// anything else.
const CLIENT_COMMANDS: [&str; 12] = [
    "CONNECT",
    "STOMP",
    "SEND",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "ACK",
    "NACK",
    "BEGIN",
    "COMMIT",
    "ABORT",
    "DISCONNECT",
    "OTHER",
];

/// `frames_sent_total{command}`: what the gateway sends.
const SERVER_COMMANDS: [&str; 5] = ["CONNECTED", "MESSAGE", "RECEIPT", "ERROR", "HEARTBEAT"];

/// Label value for frames: the command when it is a STOMP one, else a
/// fixed placeholder, so a client cannot create label values.
pub fn command_label(command: &str) -> &'static str {
    CLIENT_COMMANDS
        .into_iter()
        .chain(SERVER_COMMANDS)
        .find(|k| *k == command)
        .unwrap_or("OTHER")
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(format!("stompgate_{name}"), help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        fn counter_vec(
            registry: &Registry,
            name: &str,
            help: &str,
            label: &str,
        ) -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(format!("stompgate_{name}"), help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(format!("stompgate_{name}"), help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        }
        let sessions = IntGaugeVec::new(
            Opts::new("stompgate_sessions", "Connected STOMP sessions by version"),
            &["version"],
        )?;
        registry.register(Box::new(sessions.clone()))?;
        let held_bytes = IntGaugeVec::new(
            Opts::new(
                "stompgate_held_bytes",
                "Bytes held for clients: deliveries on their way to them, inbound frames they \
                 began and transactions they hold (limits: amqp.node_prefetch_bytes, \
                 stomp.node_inbound_bytes)",
            ),
            &["held"],
        )?;
        registry.register(Box::new(held_bytes.clone()))?;
        // Both shown from the start, at 0.
        held_bytes.with_label_values(&["deliveries"]);
        held_bytes.with_label_values(&["inbound"]);
        let publish_confirm_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "stompgate_publish_confirm_seconds",
                "Time from publishing a SEND to the broker's confirm",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(publish_confirm_seconds.clone()))?;
        let r = &registry;
        Ok(Metrics {
            connections_open: gauge(r, "connections_open", "Open WebSocket connections")?,
            sessions,
            subscriptions: gauge(r, "subscriptions", "Live STOMP subscriptions")?,
            frames_received: counter_vec(
                r,
                "frames_received_total",
                "STOMP frames received, by command",
                "command",
            )?,
            frames_sent: counter_vec(
                r,
                "frames_sent_total",
                "STOMP frames and heart-beats sent, by command",
                "command",
            )?,
            messages_published: counter(
                r,
                "messages_published_total",
                "SENDs confirmed by the broker",
            )?,
            messages_unroutable: counter(
                r,
                "messages_unroutable_total",
                "Confirmed SENDs no queue was bound for (routed:false)",
            )?,
            publish_confirm_seconds,
            deliveries: counter(
                r,
                "deliveries_total",
                "Messages received from session queues",
            )?,
            messages_delivered: counter(
                r,
                "messages_delivered_total",
                "MESSAGE frames written to clients",
            )?,
            deliveries_acked: counter(
                r,
                "deliveries_acked_total",
                "Deliveries acknowledged to the broker",
            )?,
            deliveries_requeued: counter(
                r,
                "deliveries_requeued_total",
                "Deliveries returned to the queue by NACK",
            )?,
            acked_consumption: counter_vec(
                r,
                "acked_consumption_total",
                "Sessions moved from unacknowledged consumption to acks and a prefetch, by reason",
                "reason",
            )?,
            errors: counter_vec(r, "errors_total", "ERROR frames sent, by reason", "reason")?,
            refusals: counter_vec(
                r,
                "refusals_total",
                "Connections, frames and requests refused, by the config key of the limit",
                "limit",
            )?,
            presence_published: counter_vec(
                r,
                "presence_published_total",
                "Presence messages published to other nodes, by kind",
                "op",
            )?,
            ready: gauge(
                r,
                "ready",
                "1 while /readyz answers 200: a working, unblocked broker connection and not stopping",
            )?,
            presence_outbox_overflows: counter(
                r,
                "presence_outbox_overflows_total",
                "Times presence changes were dropped past presence.max_outbox and nodes asked again",
            )?,
            presence_nodes: gauge(
                r,
                "presence_nodes",
                "Gateway nodes heard from within presence.node_timeout, this one included",
            )?,
            heartbeat_timeouts: counter(
                r,
                "heartbeat_timeouts_total",
                "Sessions closed for missing client heart-beats",
            )?,
            slow_client_disconnects: counter(
                r,
                "slow_client_disconnects_total",
                "Sessions closed because their client did not read: a write stalled past \
                 stomp.slow_client_timeout, or deliveries overran amqp.prefetch_bytes",
            )?,
            broker_up: gauge(r, "broker_up", "1 while the broker is reachable")?,
            broker_connections_opened: counter(
                r,
                "broker_connections_opened_total",
                "AMQP connections opened",
            )?,
            broker_reconnects: counter(
                r,
                "broker_reconnects_total",
                "AMQP connections opened after one was lost (the broker or the network ended it)",
            )?,
            sessions_recovered: counter(
                r,
                "sessions_recovered_total",
                "Sessions whose queue, bindings and consumer were restored after a broker outage",
            )?,
            broker_blocked: gauge(
                r,
                "broker_blocked",
                "1 while the broker blocks publishing on a connection (connection.blocked)",
            )?,
            broker_connect_failures: counter(
                r,
                "broker_connect_failures_total",
                "Attempts to open an AMQP connection that failed (each is logged, rate-limited)",
            )?,
            broker_lenient_deliveries: counter(
                r,
                "broker_lenient_deliveries_total",
                "Deliveries or returns with strings that were not UTF-8, passed on without them",
            )?,
            messages_nacked: counter(
                r,
                "messages_nacked_total",
                "SENDs the broker refused to take (basic.nack), reported on their RECEIPT",
            )?,
            held_bytes,
            registry,
        }
        .at_zero())
    }

    /// Every series with a fixed label set exists from the start, at 0:
    /// a rate() or an alert over it works before the first event.
    fn at_zero(self) -> Metrics {
        for version in ["1.0", "1.1", "1.2"] {
            self.sessions.with_label_values(&[version]);
        }
        for command in CLIENT_COMMANDS {
            self.frames_received.with_label_values(&[command]);
        }
        for command in SERVER_COMMANDS {
            self.frames_sent.with_label_values(&[command]);
        }
        for reason in ERROR_REASONS {
            self.errors.with_label_values(&[reason]);
        }
        for limit in REFUSAL_LIMITS {
            self.refusals.with_label_values(&[limit]);
        }
        for reason in ACKED_REASONS {
            self.acked_consumption.with_label_values(&[reason]);
        }
        for op in PRESENCE_OPS {
            self.presence_published.with_label_values(&[op]);
        }
        self
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
