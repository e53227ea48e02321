//! One task per WebSocket: waits for CONNECT, authenticates, opens the
//! connection's queue, then runs one `select!` loop over client frames,
//! broker deliveries, publisher confirms, heart-beats, limits, broker
//! reconnection and shutdown. Whatever ends it, the queue is deleted and
//! the channel closed before the task returns.
//!
//! Here: CONNECT, the session's state and the loop, each event handed
//! to its room: `socket` (the client's WebSocket), `subscriptions`,
//! `deliveries` (queue to MESSAGE frames, the move to acks), `acks`,
//! `publishes` (SENDs, receipts, transactions), `recovery` (broker loss)
//! and `deadlines` (the loop's timers as one).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::admin::{self, Registration, SessionEntry};
use crate::auth::{Auth, Grants};
use crate::broker::{Broker, BrokerError, BrokerSession, Confirmed, Sender};
use crate::budget::Budget;
use crate::config::Config;
use crate::destination::{DestinationError, Use};
use crate::limits::{PublishRate, Refusal};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::stomp::command::{self, ClientCommand, CommandError, Version};
use crate::stomp::frame::{Frame, FrameError};
use crate::websocket::{Message, WebSocket};

mod acks;
mod connect;
mod deadlines;
mod deliveries;
mod publishes;
mod recovery;
mod socket;
mod subscriptions;
mod watching;

use acks::Acks;
pub use connect::run;
use deadlines::{Deadlines, Due};
use deliveries::next_delivery;
use publishes::{Deferred, InFlights, Transactions};
use recovery::{opened, Opening};
use socket::{Connection, Inbound, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN};
use subscriptions::Subscriptions;

/// Longest an auto-mode delivery's ack to RabbitMQ is held back to share
/// one `multiple` ack with the next ones. Sessions of a fan-out get one
/// delivery per published message, so acking at each pause would ack each
/// delivery alone.
const ACK_DELAY: Duration = Duration::from_millis(100);

/// Header on the first MESSAGE of each subscription after the broker was
/// lost and the session restored: messages published meanwhile may have
/// been missed.
pub const GAP_HEADER: &str = "stompgate-gap";

/// What a session needs from the server.
pub struct SessionContext<B> {
    pub config: Arc<Config>,
    pub broker: B,
    pub peer: Option<SocketAddr>,
    /// The version named by the negotiated WebSocket subprotocol, if any.
    pub subprotocol: Option<Version>,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<admin::Registry>,
    pub auth: Arc<Auth>,
    /// `stomp.node_inbound_bytes`, shared by every session of the node.
    pub inbound: Arc<Budget>,
    /// A token from the upgrade request (`Authorization: Bearer` header
    /// or `access_token` query parameter), for `auth.mode = "jwt"`.
    pub upgrade_token: Option<String>,
    /// None when presence.enabled is off.
    pub presence: Option<Arc<Presence>>,
}

/// A protocol or broker failure: reported to the client in an ERROR frame,
/// after which the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Protocol(String),
    #[error("{detail}")]
    Limit { key: &'static str, detail: String },
    /// Not allowed by the configuration: `rule` is the config key.
    #[error("{detail}")]
    Denied { rule: &'static str, detail: String },
}

impl SessionError {
    /// The config key of the limit or rule that refused, if one did.
    fn limit_key(&self) -> Option<&'static str> {
        match self {
            SessionError::Frame(FrameError::TooLarge { .. }) => Some("stomp.max_frame_bytes"),
            SessionError::Frame(FrameError::TooManyHeaders { .. }) => Some("stomp.max_headers"),
            SessionError::Frame(FrameError::HeaderTooLong { .. }) => Some("stomp.max_header_bytes"),
            SessionError::Limit { key, .. } => Some(key),
            SessionError::Broker(BrokerError::Overrun { limit, .. }) => Some(limit),
            SessionError::Denied { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// The ERROR frame's `message` header: short and stable.
    fn summary(&self) -> &'static str {
        match self {
            SessionError::Frame(e) => e.summary(),
            SessionError::Command(e) => e.summary(),
            SessionError::Destination(_) => "invalid destination",
            SessionError::Broker(BrokerError::Unavailable(_)) => "broker unavailable",
            SessionError::Broker(BrokerError::Invalid(_)) => "invalid header",
            SessionError::Broker(BrokerError::Overrun { .. }) => "slow consumer",
            SessionError::Broker(_) => "broker error",
            SessionError::Protocol(_) => "protocol error",
            SessionError::Limit { .. } => "limit exceeded",
            SessionError::Denied { .. } => "access refused",
        }
    }
}

/// Why a session ended; logged once when it does.
#[derive(Debug)]
enum End {
    /// DISCONNECT, answered.
    Disconnected,
    /// The client closed the WebSocket or the connection dropped.
    PeerGone,
    /// An ERROR frame was sent.
    Failed,
    /// No frame and no heart-beat from the client for twice its period.
    HeartbeatTimeout,
    /// No CONNECT within `stomp.connect_timeout`.
    ConnectTimeout,
    /// A write did not complete within `stomp.slow_client_timeout`.
    SlowClient,
    /// The node, over amqp.node_prefetch_bytes, cut the session off while
    /// its client was not reading (no ERROR: it would not be read).
    CutOff,
    Shutdown,
}

/// Longest a session whose client is gone waits for the confirms of its
/// last SENDs before it lets its channel go.
const CLOSING_DRAIN: Duration = Duration::from_secs(1);

/// Resolves when `wait` does, or never without one. Cancel-safe when
/// `wait` is.
async fn maybe<F: Future<Output = ()>>(wait: Option<F>) {
    match wait {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

fn denied_by_grants(usage: Use, destination: &str) -> SessionError {
    SessionError::Denied {
        rule: "auth.users",
        detail: format!("{usage} to {destination:?} is not granted to this user"),
    }
}

fn shutting_down() -> Frame {
    command::error(
        "server shutting down",
        "the gateway is stopping; reconnect to another node",
        None,
    )
}

/// Logs why a connection ended before its session opened (once) and
/// counts the ends that matter.
fn record_end(end: &End, metrics: &Metrics) {
    count_end(end, metrics);
    match end {
        End::PeerGone | End::Disconnected => debug!(?end, "connection closed before CONNECTED"),
        _ => info!(?end, "connection closed before CONNECTED"),
    }
}

/// Counts the ends that matter in the metrics.
fn count_end(end: &End, metrics: &Metrics) {
    let slow = match end {
        End::HeartbeatTimeout => {
            metrics.heartbeat_timeouts.inc();
            None
        }
        End::SlowClient => Some("stomp.slow_client_timeout"),
        End::CutOff => Some("amqp.node_prefetch_bytes"),
        _ => None,
    };
    if let Some(limit) = slow {
        metrics.slow_client_disconnects.inc();
        metrics.refusals.with_label_values(&[limit]).inc();
    }
}

struct Session<B: Broker> {
    id: String,
    version: Version,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// stomp.node_inbound_bytes, for transactions and to wait on.
    inbound: Arc<Budget>,
    /// This session's line in `/admin/sessions`.
    entry: Arc<SessionEntry>,
    /// Removes the entry when the session is dropped.
    _registration: Registration,
    /// Who this session's SENDs are from, on every message it publishes.
    sender: Arc<Sender>,
    /// The session's user, for `/user/` destinations: the authenticated
    /// one, or with auth.mode = "none" CONNECT's login.
    user: Option<String>,
    /// Its memberships and `/presence/` subscriptions.
    presence: crate::presence::SessionPresence,
    /// What the authenticated user may subscribe to and publish to.
    grants: Arc<Grants>,
    /// When the credentials expire (a token's `exp`): the session ends then.
    expires: Option<Instant>,
    /// Opens the session's queue again after the broker was lost.
    factory: B,
    /// The session's queue and channel; None while reconnecting.
    broker: Option<B::Session>,
    /// Consumes with acks (see [`Session::require_acks`]): once set, for
    /// the rest of the session, across broker reconnects.
    acked: bool,
    /// How the session ended while a command was being handled, when that
    /// ending was not an ERROR for the command (the client went away).
    ended: Option<End>,
    /// While reconnecting: when to try next, and how many tries failed.
    reconnect_at: Instant,
    reconnect_failures: u32,
    /// The attempt under way to open the session's queue again: polled by
    /// the loop like any other event, so heart-beats, the client's frames
    /// and its close go on while the broker takes its time to answer.
    opening: Option<Opening<B::Session>>,
    conn: Connection,
    subscriptions: Subscriptions,
    transactions: Transactions,
    /// MESSAGEs waiting for ACKs, and acks held back for RabbitMQ.
    acks: Acks,
    /// The next MESSAGE's number (its `message-id` and `ack`).
    next_message: u64,
    in_flight: InFlights<<B::Session as BrokerSession>::Confirm>,
    /// Set by DISCONNECT (with its receipt): no more frames are read, and
    /// the session ends once everything before it has settled.
    disconnecting: Option<Option<String>>,
    rate: PublishRate,
    /// While set, the client is not read: it sent faster than
    /// `stomp.publish_rate` allows.
    throttled_until: Option<Instant>,
    send_every: Option<Duration>,
    expect_every: Option<Duration>,
}

impl<B: Broker> Session<B> {
    async fn run(&mut self, shutdown: &CancellationToken) -> End {
        // Frames that came in the same WebSocket message as CONNECT.
        if let Some(end) = self.process_buffered().await {
            return end;
        }
        loop {
            if self.in_flight.is_empty() {
                if let Some(receipt) = self.disconnecting.take() {
                    self.conn
                        .finish(receipt.map(|r| command::receipt(&r)), CLOSE_NORMAL)
                        .await;
                    return End::Disconnected;
                }
            }
            // A broker that reads nothing (blocked by an alarm) holds the
            // client back rather than its SENDs piling up in the gateway.
            let broker_writable = self.broker.as_ref().is_none_or(BrokerSession::writable);
            // Past stomp.node_inbound_bytes, the clients that hold the
            // most of it wait.
            let held_back = self.conn.held_back();
            let reading = self.disconnecting.is_none()
                && self.throttled_until.is_none()
                && self.in_flight.len() < self.config.stomp.max_unconfirmed
                && broker_writable
                && !held_back;
            let room = self
                .broker
                .as_ref()
                .filter(|_| !broker_writable)
                .map(BrokerSession::until_writable);
            let deadlines = self.deadlines(reading);
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                // Confirms first: a channel error caused by a publish is
                // reported with the publish's own reason.
                settled = self.in_flight.settle_front(), if self.in_flight.front_settleable() => {
                    self.confirmed(settled).await
                }
                // Cancel-safe (Stream::next). Not read while too many
                // publishes wait for confirms: back-pressure, not buffering.
                inbound = self.conn.read(), if reading => self.received(inbound).await,
                delivery = next_delivery(&mut self.broker) => self.queue_gave(delivery).await,
                () = self.presence.inbox.ready() => self.presence_arrived().await,
                opened = opened(&mut self.opening) => {
                    self.opening = None;
                    match self.reconnected(opened).await {
                        Ok(()) => Ok(()),
                        Err(e) => Err(self.fail(e, None).await),
                    }
                }
                due = deadlines.elapsed() => self.fell_due(due).await,
                () = maybe(room) => Ok(()),
                () = self.inbound.until_below(), if held_back => Ok(()),
                // Last, so it runs only when nothing else is ready: the
                // burst is over, send what it produced.
                _ = std::future::ready(()), if self.conn.unflushed > 0 => {
                    match self.keep_up().await {
                        Ok(()) => self.conn.flush().await,
                        Err(end) => Err(end),
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// What the loop waits for besides events, as one deadline. The
    /// client's silence counts only while it is read: its heart-beats
    /// wait in the socket, and are read first when reading resumes.
    fn deadlines(&self, reading: bool) -> Deadlines {
        let mut deadlines = Deadlines::default();
        deadlines.consider(Due::Throttle, self.throttled_until);
        let frame = self.conn.frame_deadline(self.config.stomp.frame_timeout);
        deadlines.consider(Due::Frame, frame);
        deadlines.consider(Due::Expiry, self.expires);
        let reconnect = self.broker.is_none() && self.opening.is_none();
        deadlines.consider(
            Due::Reconnect,
            Some(self.reconnect_at).filter(|_| reconnect),
        );
        let publish_timeout = self.config.amqp.publish_timeout;
        let oldest_send = self.in_flight.oldest_send().map(|t| t + publish_timeout);
        deadlines.consider(Due::Publish, oldest_send);
        let release_acks = self.acks.held_since().map(|t| t + ACK_DELAY);
        deadlines.consider(Due::ReleaseAcks, release_acks);
        let heartbeat = self.send_every.map(|d| self.conn.last_write + d);
        deadlines.consider(Due::Heartbeat, heartbeat);
        let silence = self.expect_every.filter(|_| reading);
        deadlines.consider(Due::Silence, silence.map(|d| self.conn.last_read + d * 2));
        deadlines
    }

    /// The deadline that fell due.
    async fn fell_due(&mut self, due: Due) -> Result<(), End> {
        match due {
            Due::Throttle => {
                self.throttled_until = None;
                self.process_buffered().await.map_or(Ok(()), Err)
            }
            Due::Frame => Err(self.frame_timed_out().await),
            Due::Expiry => {
                self.conn.refused("auth");
                let error = command::error(
                    "token expired",
                    "the token's exp has passed; connect again with a fresh token",
                    None,
                );
                self.conn.finish(Some(error), CLOSE_NORMAL).await;
                Err(End::Failed)
            }
            Due::Reconnect => {
                let factory = self.factory.clone();
                let (id, acked) = (self.id.clone(), self.acked);
                self.opening = Some(Box::pin(async move { factory.open(&id, acked).await }));
                Ok(())
            }
            Due::Publish => {
                let error = BrokerError::Unavailable(format!(
                    "the broker did not confirm a SEND within amqp.publish_timeout ({:?})",
                    self.config.amqp.publish_timeout
                ));
                Err(self.fail(error.into(), None).await)
            }
            Due::ReleaseAcks => self.release_acks().await,
            Due::Heartbeat => {
                self.keep_up().await?;
                self.metrics
                    .frames_sent
                    .with_label_values(&["HEARTBEAT"])
                    .inc();
                self.conn.send(Message::text("\n")).await
            }
            Due::Silence => {
                let period = self.expect_every.unwrap_or_default();
                let detail = format!(
                    "no frame or heart-beat for {:?}, twice the negotiated period",
                    period * 2
                );
                let error = command::error("heart-beat timeout", &detail, None);
                self.conn.finish(Some(error), CLOSE_NORMAL).await;
                Err(End::HeartbeatTimeout)
            }
        }
    }

    /// The oldest SEND or receipt settled.
    async fn confirmed(
        &mut self,
        settled: Result<Option<Confirmed>, BrokerError>,
    ) -> Result<(), End> {
        self.settled(settled, true).await?;
        // Frames left in the decoder when too many waited.
        if self.in_flight.len() < self.config.stomp.max_unconfirmed
            && self.conn.decoder.buffered() > 0
        {
            if let Some(end) = self.process_buffered().await {
                return Err(end);
            }
        }
        Ok(())
    }

    /// Bytes from the client (or its end).
    async fn received(&mut self, inbound: Inbound) -> Result<(), End> {
        if let Inbound::End(end) = inbound {
            return Err(end);
        }
        if let Some(end) = self.process_buffered().await {
            return Err(end);
        }
        // Checked here too: a client that never pauses keeps this branch
        // ready, and the deadline's own branch would never be reached.
        let overdue = self.conn.frame_deadline(self.config.stomp.frame_timeout);
        if overdue.is_some_and(|t| t <= Instant::now()) {
            return Err(self.frame_timed_out().await);
        }
        Ok(())
    }

    /// A frame (or WebSocket message) took longer than
    /// `stomp.frame_timeout` to arrive: ERROR and close.
    async fn frame_timed_out(&mut self) -> End {
        let frame_timeout = self.config.stomp.frame_timeout;
        let detail =
            format!("a frame took longer than stomp.frame_timeout ({frame_timeout:?}) to arrive");
        self.conn.refused("stomp.frame_timeout");
        let error = command::error("frame timeout", &detail, None);
        self.conn.finish(Some(error), CLOSE_NORMAL).await;
        End::Failed
    }

    /// Handles every complete frame the decoder holds.
    async fn process_buffered(&mut self) -> Option<End> {
        // Frames stay in the decoder while stomp.max_unconfirmed receipts
        // and SENDs wait: one WebSocket message packed with thousands of
        // frames with receipts cannot make the session hold thousands of
        // entries (the loop resumes once some settle).
        let max_unconfirmed = self.config.stomp.max_unconfirmed;
        while self.disconnecting.is_none()
            && self.throttled_until.is_none()
            && self.in_flight.len() < max_unconfirmed
        {
            if let Some(end) = self.ended.take() {
                return Some(end);
            }
            let frame = match self.conn.decoder.next_frame() {
                Ok(Some(frame)) => {
                    self.conn.count_received(&frame);
                    frame
                }
                Ok(None) => {
                    self.conn.note_partial();
                    return None;
                }
                Err(e) => return Some(self.fail(e.into(), None).await),
            };
            let receipt = frame.get("receipt").map(str::to_owned);
            if frame.command == "SEND" {
                self.throttled_until = self.rate.take(frame.wire_len());
            }
            let result = match ClientCommand::from_frame(frame, self.version) {
                Ok(command) => self.handle(command, receipt.as_deref()).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                return Some(self.fail(e, receipt.as_deref()).await);
            }
        }
        self.ended.take()
    }

    async fn handle(
        &mut self,
        command: ClientCommand,
        receipt: Option<&str>,
    ) -> Result<(), SessionError> {
        match command {
            ClientCommand::Connect(_) => {
                return Err(SessionError::Protocol(
                    "CONNECT on a session that is already connected".into(),
                ))
            }
            ClientCommand::Disconnect => {
                // The RECEIPT goes out after everything sent before it.
                self.disconnecting = Some(receipt.map(str::to_owned));
                return Ok(());
            }
            ClientCommand::Send(send) => match send.transaction.clone() {
                Some(tx) => {
                    // Checked now, not at COMMIT: a SEND that may not be
                    // published is not held at all.
                    let message = self.prepare(send)?;
                    self.transactions.defer(&tx, Deferred::Send(message))?
                }
                None => {
                    let message = self.prepare(send)?;
                    return self.publish(message, receipt).await;
                }
            },
            ClientCommand::Subscribe {
                id,
                destination,
                ack,
            } => self.subscribe(id, &destination, ack).await?,
            ClientCommand::Unsubscribe { id } => self.unsubscribe(&id).await?,
            ClientCommand::Ack { id, transaction } => match transaction {
                Some(tx) => self.transactions.defer(&tx, Deferred::Ack(id))?,
                None => self.acknowledge(&id, true).await?,
            },
            ClientCommand::Nack { id, transaction } => match transaction {
                Some(tx) => self.transactions.defer(&tx, Deferred::Nack(id))?,
                None => self.acknowledge(&id, false).await?,
            },
            ClientCommand::Begin { transaction } => self.transactions.begin(transaction)?,
            ClientCommand::Commit { transaction } => self.commit(&transaction).await?,
            ClientCommand::Abort { transaction } => {
                self.transactions.end(&transaction)?;
            }
        }
        // Behind any unsettled SENDs, so receipts keep the frames' order.
        if let Some(receipt) = receipt {
            self.in_flight.push_receipt(receipt, Instant::now());
        }
        Ok(())
    }

    /// Ends the session with an ERROR for `error`. Every SEND still in
    /// flight is named in it by its receipt: its outcome is unknown (the
    /// broker may have taken it), so a client that sends it again may
    /// deliver it twice.
    async fn fail(&mut self, error: SessionError, receipt: Option<&str>) -> End {
        debug!(%error, "session failed");
        if let Some(key) = error.limit_key() {
            self.conn.refused(key);
        }
        if let SessionError::Broker(BrokerError::Overrun { .. }) = error {
            self.metrics.slow_client_disconnects.inc();
        }
        let frame = self.with_unanswered(
            command::error(error.summary(), &error.to_string(), None),
            receipt,
        );
        self.conn.finish(Some(frame), CLOSE_NORMAL).await;
        End::Failed
    }

    /// Ends the session: the client is told why when it can still listen,
    /// in-flight publishes are confirmed, the queue and channel go.
    async fn close(mut self, end: End) {
        if let End::Shutdown = end {
            let limit = self.config.amqp.publish_timeout;
            if self.drain(true, limit).await.is_ok() {
                let frame = self.with_unanswered(shutting_down(), None);
                self.conn.finish(Some(frame), CLOSE_GOING_AWAY).await;
            }
        }
        // Publishes already sent reach RabbitMQ before the channel closes
        // (it handles a channel's frames in order); waiting a moment here
        // lets their confirms be counted. Only a moment: the client is
        // gone, and a sick broker must not keep its session alive.
        let limit = self.config.amqp.publish_timeout.min(CLOSING_DRAIN);
        let _ = self.drain(false, limit).await;
        // The queue goes with the session, but RabbitMQ (and the acked
        // count in /metrics) should know these deliveries were handed over.
        let _ = self.release_acks().await;
        if let Some(broker) = self.broker.take() {
            broker.close().await;
        }
        self.metrics
            .sessions
            .with_label_values(&[self.version.as_str()])
            .dec();
        let subscriptions = self.subscriptions.len() + self.presence.watches();
        self.metrics.subscriptions.sub(subscriptions as i64);
        count_end(&end, &self.metrics);
        // One line per session, as for its opening: why, how long, how much.
        let lasted = self.entry.connected_since.elapsed().unwrap_or_default();
        info!(
            reason = ?end,
            duration_ms = lasted.as_millis() as u64,
            messages_in = self.entry.messages_in.load(std::sync::atomic::Ordering::Relaxed),
            messages_out = self.entry.messages_out.load(std::sync::atomic::Ordering::Relaxed),
            subscriptions,
            "session closed"
        );
    }
}

/// Answers a WebSocket that a connection limit refused: an ERROR naming
/// the limit, then the close.
pub async fn refuse(
    ws: WebSocket,
    config: &Config,
    metrics: Arc<Metrics>,
    inbound: &Arc<Budget>,
    refusal: Refusal,
) {
    let mut conn = Connection::new(ws, config, metrics, inbound);
    conn.refused(refusal.key());
    let error = command::error("too many connections", &refusal.detail(), None);
    conn.finish(Some(error), CLOSE_TRY_AGAIN).await;
}
