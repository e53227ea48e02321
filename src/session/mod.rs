//! One task per WebSocket: waits for CONNECT, authenticates, opens the
//! connection's queue, then runs one `select!` loop over client frames,
//! broker deliveries, publisher confirms, heart-beats, limits, broker
//! reconnection and shutdown. Whatever ends it, the queue is deleted and
//! the channel closed before the task returns.
//!
//! Rooms: `socket` is the client's WebSocket (frames in and out,
//! batching, the close); the rest is here for now.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::admin::{self, Registration, SessionEntry};
use crate::auth::{Auth, Grants};
use crate::broker::{Broker, BrokerError, BrokerSession, Confirmed, Delivery, Publish};
use crate::budget::{Account, Budget};
use crate::config::Config;
use crate::destination::{topic_matches, Destination, DestinationError, Route, Use};
use crate::limits::{PublishRate, Refusal};
use crate::metrics::Metrics;
use crate::stomp::command::{self, AckMode, ClientCommand, CommandError, Connect, Version};
use crate::stomp::frame::{Frame, FrameError, FrameWriter};
use crate::websocket::{Message, WebSocket};

mod socket;

use socket::{Connection, Inbound, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN};

/// See [`Session::keep_up`].
const SLOW_SOCKET_GRACE: Duration = Duration::from_millis(100);

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

/// A SEND on its way to the broker, or the receipt of another frame
/// waiting its turn. Kept in frame order until settled, so receipts go out
/// in order, each after its own publish is confirmed; a SEND keeps its
/// message, so what the broker had not confirmed when it was lost can be
/// published again once it is back.
struct InFlight<C> {
    receipt: Option<String>,
    /// None for the receipt of a frame other than SEND.
    message: Option<Publish>,
    /// The broker's pending confirm; None while the message waits for the
    /// broker to come back, or once it resolved.
    confirm: Option<C>,
    /// When the client sent it: `amqp.publish_timeout` counts from here.
    since: Instant,
    /// When it was (last) published: the confirm latency counts from here.
    published: Instant,
}

impl<C> InFlight<C> {
    /// Whether this entry can settle now (a receipt marker, or a publish
    /// with a confirm to wait for), as opposed to waiting for the broker.
    fn settleable(&self) -> bool {
        self.message.is_none() || self.confirm.is_some()
    }
}

/// Longest a session whose client is gone waits for the confirms of its
/// last SENDs before it lets its channel go.
const CLOSING_DRAIN: Duration = Duration::from_secs(1);

/// Settles the oldest in-flight entry: its confirm's outcome (None for a
/// receipt marker). Cancel-safe: the confirm stays in the queue until it
/// resolves, and is taken out of it when it does.
async fn settle_front<C>(
    in_flight: &mut VecDeque<InFlight<C>>,
) -> Result<Option<Confirmed>, BrokerError>
where
    C: Future<Output = Result<Confirmed, BrokerError>> + Unpin,
{
    std::future::poll_fn(|cx| {
        let Some(front) = in_flight.front_mut() else {
            return Poll::Ready(Ok(None));
        };
        let Some(confirm) = front.confirm.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        let result = std::task::ready!(Pin::new(confirm).poll(cx));
        front.confirm = None;
        Poll::Ready(result.map(Some))
    })
    .await
}

/// The next delivery of the session's queue, or never while the broker is
/// being reconnected. Cancel-safe, like `BrokerSession::next_delivery`.
async fn next_delivery<S: BrokerSession>(
    broker: &mut Option<S>,
) -> Option<Result<Delivery, BrokerError>> {
    match broker {
        Some(broker) => broker.next_delivery().await,
        None => std::future::pending().await,
    }
}

/// A broker session being opened, boxed so the loop can keep it across
/// turns.
type Opening<S> = Pin<Box<dyn Future<Output = Result<S, BrokerError>> + Send>>;

/// The outcome of the reconnection attempt under way, or never when none
/// is. Cancel-safe: the attempt stays in `opening` until it resolves.
async fn opened<S>(opening: &mut Option<Opening<S>>) -> Result<S, BrokerError> {
    match opening {
        Some(opening) => opening.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Resolves when `wait` does, or never without one. Cancel-safe when
/// `wait` is.
async fn maybe<F: Future<Output = ()>>(wait: Option<F>) {
    match wait {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

struct Subscription {
    id: String,
    destination: Destination,
    ack: AckMode,
    /// Message numbers sent on this subscription and not yet acked, oldest
    /// first (a `client`-mode ACK covers every earlier one).
    unacked: VecDeque<u64>,
    /// Set when the broker was lost: the next MESSAGE carries the gap header.
    gap: bool,
}

/// A SEND, ACK or NACK held back until its transaction commits. A SEND
/// is held checked (destination, exchange, grants), so that COMMIT
/// publishes all or, for a SEND that could never be, nothing.
enum Deferred {
    Send(Publish),
    Ack(String),
    Nack(String),
}

struct Transaction {
    frames: Vec<Deferred>,
    bytes: usize,
    /// `bytes`, charged to stomp.node_inbound_bytes.
    account: Account,
}

/// Runs one WebSocket connection to its end.
pub async fn run<B: Broker>(ws: WebSocket, ctx: SessionContext<B>) {
    let id = format!("{:012x}", rand::random::<u64>() >> 16);
    let peer = ctx
        .peer
        .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let span = tracing::info_span!("session", session = %id, %peer);
    let _open = OpenConnection::count(ctx.metrics.clone());
    // A panic ends this session only. Unwinding drops what it holds: its
    // channel (so its exclusive queue goes), its admin entry, its
    // connection slot, and `_open` its count.
    let session =
        std::panic::AssertUnwindSafe(run_session(ws, ctx, id, peer).instrument(span.clone()));
    if let Err(panic) = session.catch_unwind().await {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        span.in_scope(|| tracing::error!(panic = what, "session panicked; only it was ended"));
    }
}

/// Counts an open WebSocket connection in `connections_open` for as long
/// as it lives, however its task ends.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn count(metrics: Arc<Metrics>) -> OpenConnection {
        metrics.connections_open.inc();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

async fn run_session<B: Broker>(ws: WebSocket, ctx: SessionContext<B>, id: String, peer: String) {
    let stomp = &ctx.config.stomp;
    let mut conn = Connection::new(ws, &ctx.config, ctx.metrics.clone(), &ctx.inbound);
    let deadline = Instant::now() + stomp.connect_timeout;
    let (connect, receipt) = tokio::select! {
        _ = ctx.shutdown.cancelled() => {
            conn.finish(Some(shutting_down()), CLOSE_GOING_AWAY).await;
            record_end(&End::Shutdown, &ctx.metrics);
            return;
        }
        first = tokio::time::timeout_at(deadline, conn.first_frame()) => match first {
            Err(_) => {
                let detail = format!(
                    "no CONNECT frame within stomp.connect_timeout ({:?})",
                    stomp.connect_timeout
                );
                let error = command::error("connect timeout", &detail, None);
                conn.refused("stomp.connect_timeout");
                conn.finish(Some(error), CLOSE_NORMAL).await;
                record_end(&End::ConnectTimeout, &ctx.metrics);
                return;
            }
            Ok(Err(end)) => {
                record_end(&end, &ctx.metrics);
                return;
            }
            Ok(Ok(frame)) => frame,
        },
    };

    let version = match negotiate(&connect, ctx.subprotocol) {
        Ok(version) => version,
        Err(error) => {
            // STOMP 1.2: the ERROR lists the versions the server supports.
            let frame = command::error(error.summary(), &error.to_string(), receipt.as_deref())
                .header("version", "1.2,1.1,1.0");
            conn.finish(Some(frame), CLOSE_NORMAL).await;
            record_end(&End::Failed, &ctx.metrics);
            return;
        }
    };
    let identity = match ctx
        .auth
        .authenticate(
            connect.login.as_deref(),
            connect.passcode.as_deref(),
            ctx.upgrade_token.as_deref(),
            ctx.peer.map(|p| p.ip()),
        )
        .await
    {
        Ok(identity) => identity,
        Err(refused) => {
            info!(login = connect.login.as_deref(), %refused, "authentication failed");
            conn.refused(refused.limit());
            let frame = command::error(refused.summary(), &refused.to_string(), receipt.as_deref());
            conn.finish(Some(frame), CLOSE_NORMAL).await;
            record_end(&End::Failed, &ctx.metrics);
            return;
        }
    };
    let broker = match ctx.broker.open(&id, false).await {
        Ok(broker) => broker,
        Err(error) => {
            warn!(%error, "could not open the session's queue");
            let end = conn.fail(error.into(), receipt.as_deref()).await;
            record_end(&end, &ctx.metrics);
            return;
        }
    };
    conn.escapes = version != Version::V1_0;
    conn.decoder.set_escapes(conn.escapes);

    // Heart-beats as in contract.md: the server sends as often as the
    // client asks, expects the client as often as it offered, never faster
    // than the floor; 0 stays 0.
    // The ceiling keeps a client's huge value from overflowing timers.
    let floor = stomp.heartbeat_min.as_millis() as u64;
    let ceiling = stomp.heartbeat_max.as_millis() as u64;
    let (cx, cy) = connect.heart_beat;
    let send_every = if cy == 0 { 0 } else { cy.clamp(floor, ceiling) };
    let expect_every = if cx == 0 { 0 } else { cx.clamp(floor, ceiling) };

    let entry = Arc::new(SessionEntry::new(
        &id,
        &peer,
        identity.user.clone(),
        version.as_str(),
        broker.queue_name(),
    ));
    conn.cut = Some(Box::pin(broker.cut_off()));
    let mut session = Session {
        id,
        version,
        config: ctx.config.clone(),
        metrics: ctx.metrics.clone(),
        inbound: ctx.inbound.clone(),
        _registration: ctx.sessions.register(entry.clone()),
        entry,
        grants: identity.grants,
        expires: identity.expires.map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Instant::now() + left
        }),
        factory: ctx.broker.clone(),
        broker: Some(broker),
        acks: false,
        ended: None,
        reconnect_at: Instant::now(),
        reconnect_failures: 0,
        opening: None,
        conn,
        subscriptions: Vec::new(),
        bindings: HashMap::new(),
        transactions: HashMap::new(),
        unacked: HashMap::new(),
        awaiting_acks: HashMap::new(),
        held_acks: None,
        ack_batch: u64::from(ctx.config.amqp.prefetch / 2).max(1),
        next_message: 0,
        in_flight: VecDeque::new(),
        disconnecting: None,
        rate: PublishRate::new(
            stomp.publish_rate,
            stomp.publish_burst,
            stomp.publish_bytes_rate,
            stomp.publish_bytes_burst,
        ),
        throttled_until: None,
        send_every: (send_every > 0).then(|| Duration::from_millis(send_every)),
        expect_every: (expect_every > 0).then(|| Duration::from_millis(expect_every)),
    };
    let connected = command::connected(version, (send_every, expect_every), &session.id);
    ctx.metrics
        .sessions
        .with_label_values(&[version.as_str()])
        .inc();
    let end = match session.conn.write(&connected).await {
        Ok(()) => {
            info!(
                version = version.as_str(),
                queue = %session.entry.queue,
                "session opened"
            );
            session.run(&ctx.shutdown).await
        }
        Err(end) => end,
    };
    session.close(end).await;
}

fn negotiate(connect: &Connect, subprotocol: Option<Version>) -> Result<Version, SessionError> {
    match &connect.accept_version {
        Some(accepted) => Version::negotiate(accepted).ok_or_else(|| {
            SessionError::Protocol(format!(
                "no common STOMP version: client accepts {accepted:?}, server supports 1.0, 1.1, 1.2"
            ))
        }),
        // STOMP 1.0 clients send no accept-version; the subprotocol, when
        // one was negotiated, says more.
        None => Ok(subprotocol.unwrap_or(Version::V1_0)),
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

/// Logs why a session ended (once) and counts the ends that matter.
fn record_end(end: &End, metrics: &Metrics) {
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
    match end {
        End::PeerGone | End::Disconnected => debug!(?end, "session closed"),
        _ => info!(?end, "session closed"),
    }
}

#[derive(Clone, Copy)]
struct HeldAcks {
    tag: u64,
    count: u64,
    since: Instant,
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
    acks: bool,
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
    /// In SUBSCRIBE order, so a delivery matching several subscriptions
    /// produces its MESSAGE frames in a stable order.
    subscriptions: Vec<Subscription>,
    /// How many subscriptions use each binding: two subscriptions with
    /// the same route share one binding on the queue.
    bindings: HashMap<Route, usize>,
    transactions: HashMap<String, Transaction>,
    /// Message number → (subscription id, delivery tag) for MESSAGEs that
    /// wait for the client's ACK.
    unacked: HashMap<u64, (String, u64)>,
    /// Delivery tag → MESSAGEs of that delivery still waiting for an ACK;
    /// the delivery is acked to RabbitMQ when this reaches zero.
    awaiting_acks: HashMap<u64, usize>,
    /// Deliveries settled without a client ACK (auto mode) whose ack to
    /// RabbitMQ is held back, to go as one `multiple` ack: the highest
    /// tag, how many, and since when. Held only while no delivery waits
    /// for a client ACK, so a `multiple` ack never covers one.
    held_acks: Option<HeldAcks>,
    /// Most acks held back before they go anyway.
    ack_batch: u64,
    next_message: u64,
    in_flight: VecDeque<InFlight<<B::Session as BrokerSession>::Confirm>>,
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
        let max_unconfirmed = self.config.stomp.max_unconfirmed;
        let publish_timeout = self.config.amqp.publish_timeout;
        let frame_timeout = self.config.stomp.frame_timeout;
        loop {
            if self.in_flight.is_empty() {
                if let Some(receipt) = self.disconnecting.take() {
                    self.conn
                        .finish(receipt.map(|r| command::receipt(&r)), CLOSE_NORMAL)
                        .await;
                    return End::Disconnected;
                }
            }
            let far = Instant::now() + Duration::from_secs(86_400);
            let heartbeat_due = self.send_every.map_or(far, |d| self.conn.last_write + d);
            let silence_limit = self
                .expect_every
                .map_or(far, |d| self.conn.last_read + d * 2);
            let oldest_send = self
                .in_flight
                .front()
                .filter(|f| f.message.is_some())
                .map(|f| f.since + publish_timeout);
            let frame_deadline = self.conn.frame_deadline(frame_timeout);
            let release_acks = self.held_acks.map(|h| h.since + ACK_DELAY);
            // A broker that reads nothing (blocked by an alarm) holds the
            // client back rather than its SENDs piling up in the gateway.
            let broker_writable = self.broker.as_ref().is_none_or(BrokerSession::writable);
            // Past stomp.node_inbound_bytes, the clients that hold the
            // most of it wait.
            let held_back = self.conn.held_back();
            let reading = self.disconnecting.is_none()
                && self.throttled_until.is_none()
                && self.in_flight.len() < max_unconfirmed
                && broker_writable
                && !held_back;
            let room = self
                .broker
                .as_ref()
                .filter(|_| !broker_writable)
                .map(BrokerSession::until_writable);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                // Confirms first: a channel error caused by a publish is
                // reported with the publish's own reason.
                settled = settle_front(&mut self.in_flight),
                    if self.in_flight.front().is_some_and(InFlight::settleable) =>
                {
                    if let Err(end) = self.settled(settled, true).await {
                        return end;
                    }
                    // Frames left in the decoder when too many waited.
                    if self.in_flight.len() < max_unconfirmed && self.conn.decoder.buffered() > 0 {
                        if let Some(end) = self.process_buffered().await {
                            return end;
                        }
                    }
                }
                // Cancel-safe (Stream::next). Not read while too many
                // publishes wait for confirms: back-pressure, not buffering.
                inbound = self.conn.read(), if reading => {
                    match inbound {
                        Inbound::Bytes => {
                            if let Some(end) = self.process_buffered().await {
                                return end;
                            }
                            // Checked here too: a client that never pauses
                            // keeps this branch ready, and the deadline's
                            // own branch below would never be reached.
                            let overdue = self.conn.frame_deadline(frame_timeout);
                            if overdue.is_some_and(|t| t <= Instant::now()) {
                                return self.frame_timed_out(frame_timeout).await;
                            }
                        }
                        Inbound::End(end) => return end,
                    }
                }
                delivery = next_delivery(&mut self.broker) => {
                    let error = match delivery {
                        Some(Ok(delivery)) => {
                            let body = delivery.body.len();
                            let delivered = match self.slowing_for(body).await {
                                Ok(Some(reason)) => self.require_acks(reason, Some(delivery)).await,
                                Ok(None) => self.deliver(delivery).await,
                                Err(end) => Err(end),
                            };
                            match delivered {
                                Ok(()) => continue,
                                Err(end) => return end,
                            }
                        }
                        Some(Err(e)) => e,
                        None => BrokerError::Unavailable(
                            "the broker cancelled the session's consumer".into(),
                        ),
                    };
                    if let Err(e) = self.check(Err::<(), _>(error)).await {
                        return self.fail(e, None).await;
                    }
                }
                _ = sleep_until(self.throttled_until.unwrap_or(far)),
                    if self.throttled_until.is_some() =>
                {
                    self.throttled_until = None;
                    if let Some(end) = self.process_buffered().await {
                        return end;
                    }
                }
                _ = sleep_until(frame_deadline.unwrap_or(far)), if frame_deadline.is_some() => {
                    return self.frame_timed_out(frame_timeout).await;
                }
                _ = sleep_until(self.expires.unwrap_or(far)), if self.expires.is_some() => {
                    self.conn.refused("auth");
                    let error = command::error(
                        "token expired",
                        "the token's exp has passed; connect again with a fresh token",
                        None,
                    );
                    self.conn.finish(Some(error), CLOSE_NORMAL).await;
                    return End::Failed;
                }
                _ = sleep_until(self.reconnect_at),
                    if self.broker.is_none() && self.opening.is_none() =>
                {
                    let factory = self.factory.clone();
                    let (id, acks) = (self.id.clone(), self.acks);
                    self.opening = Some(Box::pin(async move { factory.open(&id, acks).await }));
                }
                opened = opened(&mut self.opening) => {
                    self.opening = None;
                    if let Err(e) = self.reconnected(opened).await {
                        return self.fail(e, None).await;
                    }
                }
                () = maybe(room) => {}
                () = self.inbound.until_below(), if held_back => {}
                _ = sleep_until(oldest_send.unwrap_or(far)), if oldest_send.is_some() => {
                    let error = BrokerError::Unavailable(format!(
                        "the broker did not confirm a SEND within amqp.publish_timeout ({publish_timeout:?})"
                    ));
                    return self.fail(error.into(), None).await;
                }
                _ = sleep_until(release_acks.unwrap_or(far)), if release_acks.is_some() => {
                    if let Err(end) = self.release_acks().await {
                        return end;
                    }
                }
                _ = sleep_until(heartbeat_due), if self.send_every.is_some() => {
                    if let Err(end) = self.keep_up().await {
                        return end;
                    }
                    self.metrics.frames_sent.with_label_values(&["HEARTBEAT"]).inc();
                    if let Err(end) = self.conn.send(Message::text("\n")).await {
                        return end;
                    }
                }
                // Not while the client is not read: its heart-beats wait
                // in the socket, and are read first when reading resumes.
                _ = sleep_until(silence_limit), if self.expect_every.is_some() && reading => {
                    let detail = format!(
                        "no frame or heart-beat for {:?}, twice the negotiated period",
                        silence_limit - self.conn.last_read
                    );
                    let error = command::error("heart-beat timeout", &detail, None);
                    self.conn.finish(Some(error), CLOSE_NORMAL).await;
                    return End::HeartbeatTimeout;
                }
                // Last, so it runs only when nothing else is ready: the
                // burst is over, send what it produced.
                _ = std::future::ready(()), if self.conn.unflushed > 0 => {
                    if let Err(end) = self.keep_up().await {
                        return end;
                    }
                    if let Err(end) = self.conn.flush().await {
                        return end;
                    }
                }
            }
        }
    }

    /// A frame (or WebSocket message) took longer than
    /// `stomp.frame_timeout` to arrive: ERROR and close.
    async fn frame_timed_out(&mut self, frame_timeout: Duration) -> End {
        let detail =
            format!("a frame took longer than stomp.frame_timeout ({frame_timeout:?}) to arrive");
        self.conn.refused("stomp.frame_timeout");
        let error = command::error("frame timeout", &detail, None);
        self.conn.finish(Some(error), CLOSE_NORMAL).await;
        End::Failed
    }

    /// Passes a broker result on, except that losing the broker is not the
    /// client's problem: the session keeps going and reconnects.
    async fn check<T>(
        &mut self,
        result: Result<T, BrokerError>,
    ) -> Result<Option<T>, SessionError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(BrokerError::Unavailable(why)) => {
                self.lose_broker(&why).await;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The broker connection is gone: drop the session's side of it and
    /// start reconnecting. What was delivered but not yet acked went with
    /// the queue; unconfirmed SENDs will be published again.
    async fn lose_broker(&mut self, why: &str) {
        let Some(broker) = self.broker.take() else {
            return;
        };
        warn!(
            error = why,
            "broker lost: keeping the session and reconnecting"
        );
        // In the background: a broker that hangs must not hold the loop.
        tokio::spawn(broker.close());
        for flight in &mut self.in_flight {
            flight.confirm = None;
        }
        self.unacked.clear();
        self.awaiting_acks.clear();
        self.held_acks = None;
        for subscription in &mut self.subscriptions {
            subscription.unacked.clear();
            subscription.gap = true;
        }
        self.reconnect_failures = 0;
        self.reconnect_at = Instant::now();
    }

    /// An attempt to open the session's queue again came back: restore
    /// its bindings and consumer, then the unconfirmed SENDs in order; or
    /// plan the next attempt.
    async fn reconnected(
        &mut self,
        opened: Result<B::Session, BrokerError>,
    ) -> Result<(), SessionError> {
        let mut broker = match opened {
            Ok(broker) => broker,
            Err(BrokerError::Unavailable(why)) => {
                self.reconnect_failures = self.reconnect_failures.saturating_add(1);
                let amqp = &self.config.amqp;
                let doubling = 2u32.saturating_pow(self.reconnect_failures.min(16));
                let delay = amqp
                    .reconnect_min
                    .checked_mul(doubling)
                    .map_or(amqp.reconnect_max, |d| d.min(amqp.reconnect_max));
                debug!(error = why, ?delay, "broker still unavailable");
                self.reconnect_at = Instant::now() + delay;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let restored = async {
            for route in self.bindings.keys() {
                broker.bind(route).await?;
            }
            let now = Instant::now();
            for flight in &mut self.in_flight {
                if let Some(message) = &flight.message {
                    flight.confirm = Some(broker.publish(message).await?);
                    flight.published = now;
                }
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        match restored {
            Ok(()) => {
                info!(
                    republished = self
                        .in_flight
                        .iter()
                        .filter(|f| f.message.is_some())
                        .count(),
                    "broker back: session restored"
                );
                self.metrics.sessions_recovered.inc();
                self.conn.cut = Some(Box::pin(broker.cut_off()));
                self.broker = Some(broker);
                Ok(())
            }
            Err(e) => {
                tokio::spawn(broker.close());
                for flight in &mut self.in_flight {
                    flight.confirm = None;
                }
                let retry = matches!(e, BrokerError::Unavailable(_));
                if retry {
                    self.reconnect_at = Instant::now() + self.config.amqp.reconnect_min;
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
        }
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
                    self.defer(&tx, Deferred::Send(message))?
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
                Some(tx) => self.defer(&tx, Deferred::Ack(id))?,
                None => self.acknowledge(&id, true).await?,
            },
            ClientCommand::Nack { id, transaction } => match transaction {
                Some(tx) => self.defer(&tx, Deferred::Nack(id))?,
                None => self.acknowledge(&id, false).await?,
            },
            ClientCommand::Begin { transaction } => {
                if self.transactions.contains_key(&transaction) {
                    return Err(SessionError::Protocol(format!(
                        "transaction {transaction:?} has already begun"
                    )));
                }
                let limit = self.config.stomp.max_transactions;
                if self.transactions.len() >= limit {
                    return Err(SessionError::Limit {
                        key: "stomp.max_transactions",
                        detail: format!(
                            "more than stomp.max_transactions ({limit}) open transactions"
                        ),
                    });
                }
                let tx = Transaction {
                    frames: Vec::new(),
                    bytes: 0,
                    account: self.inbound.account(),
                };
                self.transactions.insert(transaction, tx);
            }
            ClientCommand::Commit { transaction } => {
                let tx = self.take_transaction(&transaction)?;
                for deferred in tx.frames {
                    match deferred {
                        Deferred::Send(message) => self.publish(message, None).await?,
                        Deferred::Ack(id) => self.acknowledge(&id, true).await?,
                        Deferred::Nack(id) => self.acknowledge(&id, false).await?,
                    }
                }
            }
            ClientCommand::Abort { transaction } => {
                self.take_transaction(&transaction)?;
            }
        }
        // Behind any unsettled SENDs, so receipts keep the frames' order.
        if let Some(receipt) = receipt {
            let now = Instant::now();
            self.in_flight.push_back(InFlight {
                receipt: Some(receipt.to_owned()),
                message: None,
                confirm: None,
                since: now,
                published: now,
            });
        }
        Ok(())
    }

    fn take_transaction(&mut self, name: &str) -> Result<Transaction, SessionError> {
        self.transactions
            .remove(name)
            .ok_or_else(|| SessionError::Protocol(format!("no transaction {name:?} has begun")))
    }

    fn defer(&mut self, name: &str, deferred: Deferred) -> Result<(), SessionError> {
        let stomp = &self.config.stomp;
        let Some(tx) = self.transactions.get_mut(name) else {
            return Err(SessionError::Protocol(format!(
                "no transaction {name:?} has begun"
            )));
        };
        if tx.frames.len() >= stomp.max_transaction_frames {
            return Err(SessionError::Limit {
                key: "stomp.max_transaction_frames",
                detail: format!(
                    "transaction {name:?} holds more than stomp.max_transaction_frames ({}) frames",
                    stomp.max_transaction_frames
                ),
            });
        }
        if let Deferred::Send(message) = &deferred {
            // Headers cost memory as bodies do.
            let headers: usize = message
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum();
            tx.bytes += message.body.len() + headers;
            tx.account.set(tx.bytes);
            if tx.account.budget().over() {
                return Err(SessionError::Limit {
                    key: "stomp.node_inbound_bytes",
                    detail: format!(
                        "the node holds more than stomp.node_inbound_bytes ({} bytes) for its \
                         clients: transaction {name:?} can take no more",
                        tx.account.budget().limit()
                    ),
                });
            }
            if tx.bytes > stomp.max_transaction_bytes {
                return Err(SessionError::Limit {
                    key: "stomp.max_transaction_bytes",
                    detail: format!(
                        "transaction {name:?} holds more than stomp.max_transaction_bytes ({} bytes)",
                        stomp.max_transaction_bytes
                    ),
                });
            }
        }
        tx.frames.push(deferred);
        Ok(())
    }

    /// A SEND as a message to publish, once its destination is valid and
    /// granted.
    fn prepare(&self, send: command::Send) -> Result<Publish, SessionError> {
        let destination =
            Destination::parse(&send.destination, Use::Send, &self.config.amqp.exchange)?;
        self.check_exchange(&destination)?;
        if !self.grants.may_publish(&destination.route) {
            return Err(denied_by_grants(Use::Send, &send.destination));
        }
        Ok(Publish {
            route: destination.route,
            headers: send.headers,
            body: send.body,
        })
    }

    /// Publishes a message (or holds it while the broker is away); its
    /// confirm and receipt join the in-flight queue.
    async fn publish(
        &mut self,
        message: Publish,
        receipt: Option<&str>,
    ) -> Result<(), SessionError> {
        self.entry.messages_in.fetch_add(1, Ordering::Relaxed);
        let confirm = match self.broker.as_mut() {
            Some(broker) => {
                let result = broker.publish(&message).await;
                self.check(result).await?
            }
            None => None,
        };
        let now = Instant::now();
        self.in_flight.push_back(InFlight {
            receipt: receipt.map(str::to_owned),
            message: Some(message),
            confirm,
            since: now,
            published: now,
        });
        Ok(())
    }

    fn check_exchange(&self, destination: &Destination) -> Result<(), SessionError> {
        let exchange = &destination.route.exchange;
        if self.config.amqp.exchange_allowed(exchange) {
            return Ok(());
        }
        Err(SessionError::Denied {
            rule: "amqp.allowed_exchanges",
            detail: format!("exchange {exchange:?} is not in amqp.allowed_exchanges"),
        })
    }

    async fn subscribe(
        &mut self,
        id: String,
        destination: &str,
        ack: AckMode,
    ) -> Result<(), SessionError> {
        if self.subscriptions.iter().any(|s| s.id == id) {
            return Err(SessionError::Protocol(format!(
                "subscription id {id:?} is already in use on this connection"
            )));
        }
        let limit = self.config.stomp.max_subscriptions;
        if self.subscriptions.len() >= limit {
            return Err(SessionError::Limit {
                key: "stomp.max_subscriptions",
                detail: format!("more than stomp.max_subscriptions ({limit}) subscriptions"),
            });
        }
        let destination_name = destination;
        let destination =
            Destination::parse(destination, Use::Subscribe, &self.config.amqp.exchange)?;
        self.check_exchange(&destination)?;
        if !self.grants.may_subscribe(&destination.route) {
            return Err(denied_by_grants(Use::Subscribe, destination_name));
        }
        if ack.needs_ack() {
            // What came without acks was meant for the subscriptions
            // made before this one, and goes to them first.
            if let Err(end) = self.require_acks("client_ack", None).await {
                self.ended = Some(end);
                return Ok(());
            }
        }
        let users = self.bindings.get(&destination.route).copied().unwrap_or(0);
        // While reconnecting, the binding is made when the queue is back.
        if let (0, Some(broker)) = (users, self.broker.as_mut()) {
            let result = broker.bind(&destination.route).await;
            self.check(result).await?;
        }
        self.bindings.insert(destination.route.clone(), users + 1);
        debug!(id, destination = ?destination.route, "subscribed");
        self.metrics.subscriptions.inc();
        self.entry.subscribed(&id, destination_name);
        self.subscriptions.push(Subscription {
            id,
            destination,
            ack,
            unacked: VecDeque::new(),
            gap: false,
        });
        Ok(())
    }

    async fn unsubscribe(&mut self, id: &str) -> Result<(), SessionError> {
        let Some(index) = self.subscriptions.iter().position(|s| s.id == id) else {
            return Err(SessionError::Protocol(format!(
                "no subscription with id {id:?}"
            )));
        };
        let subscription = self.subscriptions.remove(index);
        self.metrics.subscriptions.dec();
        self.entry.unsubscribed(id);
        let route = subscription.destination.route;
        // Messages the client never acked on a subscription it left are
        // settled as consumed: requeueing them would redeliver them to the
        // connection's other subscriptions.
        for number in subscription.unacked {
            if let Some((_, tag)) = self.unacked.remove(&number) {
                self.settle_message(tag, true).await?;
            }
        }
        let last_user = match self.bindings.get_mut(&route) {
            Some(users) if *users > 1 => {
                *users -= 1;
                false
            }
            _ => true,
        };
        if last_user {
            self.bindings.remove(&route);
            if let Some(broker) = self.broker.as_mut() {
                let result = broker.unbind(&route).await;
                self.check(result).await?;
            }
        }
        Ok(())
    }

    /// Sends a delivery as one MESSAGE per matching subscription.
    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        self.metrics.deliveries.inc();
        // One queue receives a message once even when several bindings
        // match it, so the session fans it out to its subscriptions.
        let mut awaiting = 0;
        // The MESSAGE's bytes, near enough for one allocation: 160 covers
        // the headers the session adds (ids, destination prefix, ack,
        // redelivered, gap, content-length) for ordinary ids and prefixes.
        let size_hint = 160
            + delivery.routing_key.len()
            + delivery
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>()
            + delivery.body.len();
        // By index: writing a MESSAGE needs `self` while a subscription is
        // borrowed, and collecting the matches would allocate per delivery.
        for index in 0..self.subscriptions.len() {
            let route = &self.subscriptions[index].destination.route;
            if route.exchange != delivery.exchange
                || !topic_matches(&route.key, &delivery.routing_key)
            {
                continue;
            }
            let number = self.next_message;
            self.next_message += 1;
            let subscription = &mut self.subscriptions[index];
            let mut frame = FrameWriter::new("MESSAGE", self.conn.escapes, size_hint);
            frame.header("subscription", &subscription.id);
            frame.header_number("message-id", number);
            frame.header_parts(
                "destination",
                &[&subscription.destination.prefix, &delivery.routing_key],
            );
            if subscription.ack.needs_ack() && !delivery.settled {
                frame.header_number("ack", number);
                subscription.unacked.push_back(number);
                self.unacked
                    .insert(number, (subscription.id.clone(), delivery.tag));
                awaiting += 1;
            }
            if delivery.redelivered {
                frame.header("redelivered", "true");
            }
            if std::mem::take(&mut subscription.gap) {
                // The first MESSAGE after a broker outage: what was
                // published during it may not have reached this queue.
                frame.header(GAP_HEADER, "true");
            }
            for (name, value) in &delivery.headers {
                frame.header(name, value);
            }
            self.conn
                .write_message(frame.finish(&delivery.body))
                .await?;
            self.metrics.messages_delivered.inc();
            self.entry.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        if delivery.settled {
            return Ok(());
        }
        if awaiting > 0 {
            self.awaiting_acks.insert(delivery.tag, awaiting);
            return Ok(());
        }
        // Auto mode (or a message for a subscription that has just gone):
        // written to the socket, so done.
        if self.awaiting_acks.is_empty() {
            let held = self.held_acks.get_or_insert(HeldAcks {
                tag: delivery.tag,
                count: 0,
                since: Instant::now(),
            });
            held.tag = delivery.tag;
            held.count += 1;
            if held.count >= self.ack_batch {
                self.release_acks().await?;
            }
            return Ok(());
        }
        // Deliveries wait for client ACKs: a `multiple` ack would cover
        // them, so this one goes alone.
        self.release_acks().await?;
        self.ack_broker(delivery.tag, false, 1).await
    }

    /// Why a session on the fast path must move to acked consumption now,
    /// if it must: it fell a prefetch behind, or a write would wait for
    /// the client. Either way deliveries would pile up in the gateway,
    /// where nothing bounds them; with acks RabbitMQ holds them.
    async fn slowing(&mut self) -> Result<Option<&'static str>, End> {
        self.slowing_for(0).await
    }

    /// [`Session::slowing`], for a delivery of `body` bytes: one larger
    /// than `amqp.no_ack_max_body` moves the session to acks too, as a
    /// session that must slow down can find a few hundred deliveries
    /// already on their way without acks.
    async fn slowing_for(&mut self, body: usize) -> Result<Option<&'static str>, End> {
        let Some(broker) = self.broker.as_ref().filter(|b| !b.acks()) else {
            return Ok(None);
        };
        if broker.behind() {
            return Ok(Some("backlog"));
        }
        if body > self.config.amqp.no_ack_max_body {
            return Ok(Some("large_message"));
        }
        Ok(self.conn.backed_up().await?.then_some("slow_socket"))
    }

    /// Before a write that may wait for the client: see [`Session::slowing`].
    /// On the fast path, what is buffered must also go within
    /// SLOW_SOCKET_GRACE: a client that stopped reading mid-batch (less
    /// than FLUSH_BYTES buffered, which the per-delivery check leaves be)
    /// would otherwise hold the session in the flush that follows for up
    /// to stomp.slow_client_timeout, deliveries piling up behind it
    /// without acks. A client only a moment behind stays on the fast path.
    async fn keep_up(&mut self) -> Result<(), End> {
        let mut reason = self.slowing().await?;
        let fast = self.broker.as_ref().is_some_and(|b| !b.acks());
        if reason.is_none()
            && fast
            && self.conn.unflushed > 0
            && !self.conn.flush_within(SLOW_SOCKET_GRACE).await?
        {
            reason = Some("slow_socket");
        }
        match reason {
            Some(reason) => self.require_acks(reason, None).await,
            None => Ok(()),
        }
    }

    /// Moves the session from the fast path (deliveries without acks) to
    /// acked consumption with a prefetch, for good, then delivers `first`
    /// and what had come without acks, in order.
    async fn require_acks(
        &mut self,
        reason: &'static str,
        first: Option<Delivery>,
    ) -> Result<(), End> {
        self.acks = true;
        let mut early = Vec::new();
        if let Some(broker) = self.broker.as_mut().filter(|b| !b.acks()) {
            self.metrics
                .acked_consumption
                .with_label_values(&[reason])
                .inc();
            let result = broker.require_acks().await;
            match self.check(result).await {
                Ok(taken) => early = taken.unwrap_or_default(),
                Err(e) => return Err(self.fail(e, None).await),
            }
            debug!(
                reason,
                early = early.len(),
                "consuming with acks from now on"
            );
        }
        for delivery in first.into_iter().chain(early) {
            self.deliver(delivery).await?;
        }
        Ok(())
    }

    /// Sends the acks held back by [`Session::deliver`] as one.
    async fn release_acks(&mut self) -> Result<(), End> {
        match self.held_acks.take() {
            Some(held) => self.ack_broker(held.tag, true, held.count).await,
            None => Ok(()),
        }
    }

    async fn ack_broker(&mut self, tag: u64, multiple: bool, count: u64) -> Result<(), End> {
        if let Some(broker) = self.broker.as_mut() {
            let result = broker.ack(tag, multiple).await;
            match self.check(result).await {
                Ok(Some(())) => self.metrics.deliveries_acked.inc_by(count),
                Ok(None) => {}
                Err(e) => return Err(self.fail(e, None).await),
            }
        }
        Ok(())
    }

    /// ACK (`positive`) or NACK of the MESSAGE whose `ack` header was `id`.
    async fn acknowledge(&mut self, id: &str, positive: bool) -> Result<(), SessionError> {
        let Ok(number) = id.parse::<u64>() else {
            return Err(SessionError::Protocol(format!(
                "ACK/NACK names no message of this session: {id:?}"
            )));
        };
        // An id already settled (e.g. covered by an earlier cumulative
        // ACK, or gone with the broker) is not an error: clients may ACK
        // every message anyway.
        let Some((subscription_id, _)) = self.unacked.get(&number) else {
            debug!(number, "ACK/NACK of a message already settled");
            return Ok(());
        };
        let Some(subscription) = self
            .subscriptions
            .iter_mut()
            .find(|s| &s.id == subscription_id)
        else {
            return Ok(());
        };
        let numbers: Vec<u64> = match subscription.ack {
            AckMode::Client => {
                let upto = subscription
                    .unacked
                    .iter()
                    .position(|&n| n == number)
                    .map_or(0, |p| p + 1);
                subscription.unacked.drain(..upto).collect()
            }
            _ => {
                subscription.unacked.retain(|&n| n != number);
                vec![number]
            }
        };
        for number in numbers {
            if let Some((_, tag)) = self.unacked.remove(&number) {
                self.settle_message(tag, positive).await?;
            }
        }
        Ok(())
    }

    /// One MESSAGE of delivery `tag` settled by the client. The delivery is
    /// acked once all its MESSAGEs are; a NACK of any returns it to the
    /// queue at once, and its other MESSAGEs no longer wait.
    async fn settle_message(&mut self, tag: u64, positive: bool) -> Result<(), SessionError> {
        let Some(remaining) = self.awaiting_acks.get_mut(&tag) else {
            return Ok(());
        };
        if positive {
            *remaining -= 1;
            if *remaining > 0 {
                return Ok(());
            }
            self.awaiting_acks.remove(&tag);
            if let Some(broker) = self.broker.as_mut() {
                let result = broker.ack(tag, false).await;
                if self.check(result).await?.is_some() {
                    self.metrics.deliveries_acked.inc();
                }
            }
            return Ok(());
        }
        self.awaiting_acks.remove(&tag);
        let orphans: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, (_, t))| *t == tag)
            .map(|(n, _)| *n)
            .collect();
        for number in orphans {
            if let Some((subscription_id, _)) = self.unacked.remove(&number) {
                if let Some(s) = self
                    .subscriptions
                    .iter_mut()
                    .find(|s| s.id == subscription_id)
                {
                    s.unacked.retain(|&n| n != number);
                }
            }
        }
        if let Some(broker) = self.broker.as_mut() {
            let result = broker.nack(tag, true).await;
            if self.check(result).await?.is_some() {
                self.metrics.deliveries_requeued.inc();
            }
        }
        Ok(())
    }

    /// The oldest in-flight entry settled: send its receipt (when
    /// `receipts`), or report why the broker refused, or go reconnecting
    /// if the broker went away.
    async fn settled(
        &mut self,
        result: Result<Option<Confirmed>, BrokerError>,
        receipts: bool,
    ) -> Result<(), End> {
        let confirmed = match result {
            Ok(confirmed) => confirmed,
            Err(BrokerError::Unavailable(why)) => {
                self.lose_broker(&why).await;
                return Ok(());
            }
            Err(e) => {
                let receipt = self.in_flight.front().and_then(|f| f.receipt.clone());
                return Err(self.fail(e.into(), receipt.as_deref()).await);
            }
        };
        let Some(flight) = self.in_flight.pop_front() else {
            return Ok(());
        };
        if let Some(confirmed) = confirmed {
            self.count_confirm(confirmed, flight.published.elapsed());
        }
        let Some(receipt) = flight.receipt.filter(|_| receipts) else {
            return Ok(());
        };
        let mut frame = command::receipt(&receipt);
        if let Some(confirmed) = confirmed {
            let routed = confirmed == Confirmed::Routed;
            frame = frame.header("routed", routed.to_string());
            if confirmed == Confirmed::Nacked {
                frame = frame.header("stompgate-nacked", "true");
            }
        }
        self.keep_up().await?;
        self.conn.write(&frame).await
    }

    fn count_confirm(&self, confirmed: Confirmed, took: Duration) {
        match confirmed {
            Confirmed::Nacked => {
                self.metrics.messages_nacked.inc();
                return;
            }
            Confirmed::Unroutable => self.metrics.messages_unroutable.inc(),
            Confirmed::Routed => {}
        }
        self.metrics.messages_published.inc();
        self.metrics
            .publish_confirm_seconds
            .observe(took.as_secs_f64());
    }

    /// Settles what can settle within `limit`: confirms still on their
    /// way (with their receipts when `receipts`). SENDs held for a broker
    /// that is away stay unconfirmed and get no receipt.
    async fn drain(&mut self, receipts: bool, limit: Duration) -> Result<(), End> {
        let drained = timeout(limit, async {
            while self.in_flight.front().is_some_and(InFlight::settleable) {
                let result = settle_front(&mut self.in_flight).await;
                if result.is_err() && !receipts {
                    break;
                }
                self.settled(result, receipts).await?;
            }
            Ok(())
        })
        .await;
        drained.unwrap_or_else(|_| {
            warn!(
                unconfirmed = self.in_flight.len(),
                ?limit,
                "publishes still unconfirmed when the session ended"
            );
            Ok(())
        })
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

    /// `frame`, an ERROR, with `receipt-id` (the frame's own `receipt`, or
    /// the first unanswered one) and the list of SENDs whose receipts will
    /// never come.
    fn with_unanswered(&self, mut frame: Frame, receipt: Option<&str>) -> Frame {
        let unanswered: Vec<&str> = self
            .in_flight
            .iter()
            .filter(|f| f.message.is_some())
            .filter_map(|f| f.receipt.as_deref())
            .collect();
        if let Some(id) = receipt.or(unanswered.first().copied()) {
            frame = frame.header("receipt-id", id);
        }
        if unanswered.is_empty() {
            return frame;
        }
        frame = frame
            .header("stompgate-outcome", "unknown")
            .header("stompgate-unanswered", unanswered.len().to_string());
        let mut body = frame.body.to_vec();
        body.extend_from_slice(
            format!(
                "\n\noutcome unknown: the broker may still deliver the SENDs with these receipts, \
                 so sending them again may deliver them twice: {}\n",
                unanswered.join(", ")
            )
            .as_bytes(),
        );
        frame.body(body)
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
        self.metrics
            .subscriptions
            .sub(self.subscriptions.len() as i64);
        record_end(&end, &self.metrics);
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
