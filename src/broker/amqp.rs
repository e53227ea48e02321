//! RabbitMQ behind the broker port, on the gateway's own AMQP client
//! ([`client`]).
//!
//! Each session gets its own AMQP channel on a pooled connection, and on it
//! one queue `stompgate.<node-id>.<session-id>` (exclusive, auto-delete,
//! bounded length), consumed without acks while the session keeps up and
//! with acks and a prefetch once it needs them; publisher confirms on.
//! Up to `amqp.pool_size` connections per broker URL: when one broker
//! cannot give a connection, the next is tried. Connections are shared: a
//! session opens its channel on the first one with room that the broker
//! does not block, and a new connection is opened once each carries
//! `amqp.sessions_per_connection` channels (or the broker's `channel_max`),
//! so the pool grows with the sessions.
//!
//! What the client reports ends here: lost connections and failed
//! attempts are logged (rate-limited, URL without its password) and
//! counted, `connection.blocked` makes the node unready, and readiness is
//! state, never a live probe.

pub mod client;
mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, confirm, queue, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use futures_util::future::Map;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::{Broker, BrokerError, BrokerSession, Confirmed, Delivery, Publish, Readiness};
use crate::budget::Budget;
use crate::config::{AmqpConfig, Overflow};
use crate::destination::Route;
use crate::metrics::Metrics;
use client::{Channel, Connection, Holding, Message, Options, STAMP_HEADER};

/// STOMP headers that describe the frame itself, not the message, or
/// that only a server sets: they never travel to RabbitMQ from a SEND,
/// nor reach a MESSAGE from an AMQP publisher's headers. A client cannot
/// forge a receipt, a message id, a subscription or who it is.
const STOMP_OWN_HEADERS: [&str; 11] = [
    STAMP_HEADER,
    "destination",
    "receipt",
    "receipt-id",
    "transaction",
    "content-length",
    "message-id",
    "subscription",
    "ack",
    "redelivered",
    "user-id",
];

/// Headers the gateway sets (`stompgate-gap`…) start with this: whoever
/// else sets them, a SEND's client or an AMQP publisher, is ignored.
const GATEWAY_PREFIX: &str = "stompgate-";

/// Whether a header is STOMP's or the gateway's own, never a message's.
fn reserved(name: &str) -> bool {
    STOMP_OWN_HEADERS.contains(&name) || name.starts_with(GATEWAY_PREFIX)
}

/// Bounds the queue deletion and channel close at session end, so a dead
/// broker cannot hold a session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed connection attempts are logged at most this often, with how
/// many were left out since.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);
/// After a failed attempt, sessions asking for a connection within this
/// long get the same failure at once instead of each waiting out its own
/// `amqp.connect_timeout` in turn.
const FAIL_FAST_FOR: Duration = Duration::from_secs(1);
/// While the node holds more than amqp.node_prefetch_bytes of deliveries,
/// a session holding more than this is ended as too slow: a client that
/// keeps up holds far less.
const NODE_FLOOR: usize = 1 << 20;

#[derive(Clone)]
pub struct AmqpBroker {
    /// Broker URLs, in config order.
    urls: Arc<[String]>,
    /// The broker that gave the last good connection: tried first.
    current: Arc<AtomicUsize>,
    /// Open connections, shared by sessions.
    held: Arc<tokio::sync::Mutex<Vec<Held>>>,
    sessions_per_connection: usize,
    pool_size: usize,
    health: Arc<Health>,
    node_id: String,
    prefetch: u16,
    prefetch_bytes: usize,
    queue_max_length: u32,
    queue_max_bytes: u64,
    queue_overflow: Overflow,
    connect_timeout: Duration,
    /// What every connection is opened with; its observer is per connection.
    options: Options,
    metrics: Arc<Metrics>,
}

/// A shared connection and its load: every session on it holds a clone
/// of `load`, so the strong count less one is its number of channels.
struct Held {
    connection: Connection,
    load: Arc<()>,
}

impl Held {
    fn sessions(&self) -> usize {
        Arc::strong_count(&self.load) - 1
    }
}

/// The broker link as `/readyz`, new WebSockets and the metrics see it:
/// kept up to date by the connections' observers and by connection
/// attempts, read without any I/O.
struct Health {
    /// The last attempt gave a connection, and not every one was lost since.
    up: AtomicBool,
    /// A connection was attempted: until then the link is starting.
    tried: AtomicBool,
    /// A connection was lost since the last one was opened: the next
    /// opening counts as a reconnect.
    lost: AtomicBool,
    /// Connections open now, and how many of them the broker blocks.
    open: AtomicUsize,
    blocked: AtomicUsize,
    /// Why the broker is unavailable or blocked, for `/readyz`.
    why: Mutex<String>,
    /// When the last attempt failed, and the failure: see FAIL_FAST_FOR.
    failed: Mutex<Option<(Instant, String)>>,
    /// When a failed attempt was last logged, and how many were not since.
    logged: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
    /// A delivery with strings that are not UTF-8 was logged already.
    lenient_logged: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Watches one connection for the broker: [`client::Observer`].
struct Watch {
    url: String,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Whether this connection is counted in `Health::blocked`.
    blocked: AtomicBool,
    /// OPENING, OPEN (counted in `Health::open`) or ENDED: a connection
    /// can end before its opener counted it, and must not be uncounted
    /// then.
    state: AtomicU8,
}

const OPENING: u8 = 0;
const OPEN: u8 = 1;
const ENDED: u8 = 2;

impl Watch {
    /// Counts the connection as open, unless it has ended already.
    fn opened(&self) {
        self.health.open.fetch_add(1, Ordering::AcqRel);
        if self
            .state
            .compare_exchange(OPENING, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.health.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl client::Observer for Watch {
    fn blocked(&self, reason: Option<&str>) {
        let health = &self.health;
        match reason {
            Some(reason) => {
                tracing::warn!(url = %self.url, reason, "the broker blocks publishing on a connection");
                *lock(&health.why) = format!("the broker blocks publishing: {reason}");
                if !self.blocked.swap(true, Ordering::Relaxed) {
                    health.blocked.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                tracing::info!(url = %self.url, "the broker unblocked publishing on a connection");
                if self.blocked.swap(false, Ordering::Relaxed) {
                    health.blocked.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let any = health.blocked.load(Ordering::Relaxed) > 0;
        self.metrics.broker_blocked.set(i64::from(any));
    }

    fn lenient(&self, dropped: u32) {
        self.metrics.broker_lenient_deliveries.inc();
        if !self.health.lenient_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                url = %self.url,
                dropped,
                "a message had strings that are not UTF-8 (header names or properties): \
                 delivered without them; counted in broker_lenient_deliveries_total, \
                 logged once"
            );
        }
    }

    fn ended(&self, why: &str, by_gateway: bool) {
        let health = &self.health;
        if self.blocked.swap(false, Ordering::Relaxed) {
            health.blocked.fetch_sub(1, Ordering::Relaxed);
            let any = health.blocked.load(Ordering::Relaxed) > 0;
            self.metrics.broker_blocked.set(i64::from(any));
        }
        let was_open = self.state.swap(ENDED, Ordering::AcqRel) == OPEN;
        let left = match was_open {
            true => health.open.fetch_sub(1, Ordering::AcqRel).saturating_sub(1),
            false => health.open.load(Ordering::Acquire),
        };
        if by_gateway {
            return;
        }
        tracing::warn!(url = %self.url, error = why, "AMQP connection lost");
        health.lost.store(true, Ordering::Relaxed);
        if left == 0 {
            *lock(&health.why) = format!("connection lost: {why}");
            health.up.store(false, Ordering::Relaxed);
            self.metrics.broker_up.set(0);
        }
    }
}

impl AmqpBroker {
    /// Prepares the broker list; connections are opened on first use, so
    /// the gateway starts (and `/readyz` says 503) while RabbitMQ is down.
    pub fn new(
        config: &AmqpConfig,
        node_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<AmqpBroker, BrokerError> {
        let urls = config.all_urls().map(str::to_owned).collect::<Vec<_>>();
        let tls = crate::tls::amqp_client_config(&config.tls).map_err(BrokerError::Invalid)?;
        let mut options = Options::new(&format!("stompgate {node_id}"));
        options.heartbeat = u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX);
        options.call_timeout = config.call_timeout;
        options.tls = Some(tls);
        options.holding = Some(Holding {
            per_channel: config.prefetch_bytes,
            floor: NODE_FLOOR,
            node: Budget::new(
                config.node_prefetch_bytes,
                metrics.held_bytes.with_label_values(&["deliveries"]),
            ),
        });
        Ok(AmqpBroker {
            urls: urls.into(),
            current: Arc::new(AtomicUsize::new(0)),
            held: Arc::new(tokio::sync::Mutex::new(Vec::new())),
            sessions_per_connection: config.sessions_per_connection,
            pool_size: config.pool_size,
            health: Arc::new(Health {
                up: AtomicBool::new(false),
                tried: AtomicBool::new(false),
                lost: AtomicBool::new(false),
                open: AtomicUsize::new(0),
                blocked: AtomicUsize::new(0),
                why: Mutex::new(String::new()),
                failed: Mutex::new(None),
                logged: Mutex::new(None),
                unlogged: AtomicU64::new(0),
                lenient_logged: AtomicBool::new(false),
            }),
            node_id: node_id.to_owned(),
            prefetch: config.prefetch,
            prefetch_bytes: config.prefetch_bytes,
            queue_max_length: config.queue_max_length,
            queue_max_bytes: config.queue_max_bytes,
            queue_overflow: config.queue_overflow,
            connect_timeout: config.connect_timeout,
            options,
            metrics,
        })
    }

    fn set_up(&self, up: bool) {
        self.health.tried.store(true, Ordering::Relaxed);
        self.health.up.store(up, Ordering::Relaxed);
        if !up {
            self.health.lost.store(true, Ordering::Relaxed);
        }
        self.metrics.broker_up.set(i64::from(up));
    }

    /// How many sessions a connection takes: ours, or the broker's
    /// `channel_max` when that is lower.
    fn capacity(&self, connection: &Connection) -> usize {
        self.sessions_per_connection.min(connection.channel_max())
    }

    /// A connection for one more session: the first live, unblocked one
    /// held that has room, else a new one (or, past `amqp.pool_size` per
    /// broker, the least loaded unblocked one). Packing sessions onto the
    /// fewest connections was measured with lapin, whose every connection
    /// had an I/O thread: a fan-out spread over two cost 15–20% more CPU
    /// per delivery. With this client's tasks, 100 sessions per
    /// connection instead of 1000 changed neither CPU nor latency at 1000
    /// subscribers. A connection the broker blocks (a resource alarm) is
    /// passed over: the broker reads nothing from it, so a session opened
    /// there would wait for its channel. Returns the session's share of
    /// the load.
    async fn share(&self) -> Result<(Connection, Arc<()>), BrokerError> {
        let mut held = self.held.lock().await;
        held.retain(|h| h.connection.is_open());
        let usable = |h: &Held| h.connection.blocked().is_none();
        let room = held
            .iter()
            .position(|h| usable(h) && h.sessions() < self.capacity(&h.connection));
        let index = match room {
            Some(index) => Some(index),
            None if held.len() < self.pool_size * self.urls.len() => {
                match self.connection().await {
                    Ok(connection) => {
                        held.push(Held {
                            connection,
                            load: Arc::new(()),
                        });
                        Some(held.len() - 1)
                    }
                    Err(e) if !held.iter().any(usable) => return Err(e),
                    Err(_) => None,
                }
            }
            None => None,
        };
        // Past what the pools can give, sessions share what there is.
        let h = match index {
            Some(index) => &held[index],
            None => held
                .iter()
                .filter(|h| usable(h))
                .min_by_key(|h| h.sessions())
                .ok_or_else(|| match held.first().and_then(|h| h.connection.blocked()) {
                    Some(reason) => BrokerError::Unavailable(format!(
                        "the broker blocks publishing ({reason}): try again later"
                    )),
                    None => BrokerError::Unavailable("no broker connection".into()),
                })?,
        };
        // A connection serves: whatever a failed attempt to open another
        // said, the broker is up.
        self.set_up(true);
        Ok((h.connection.clone(), h.load.clone()))
    }

    /// A new connection, to the broker that gave the last one or else the
    /// next in turn; whether one could be had sets `broker_up`. Right
    /// after a failed attempt, fails at once with the same reason.
    async fn connection(&self) -> Result<Connection, BrokerError> {
        if let Some((at, why)) = lock(&self.health.failed).as_ref() {
            if at.elapsed() < FAIL_FAST_FOR {
                return Err(BrokerError::Unavailable(why.clone()));
            }
        }
        let first = self.current.load(Ordering::Relaxed);
        let mut failure = String::from("no broker configured");
        for i in 0..self.urls.len() {
            let index = (first + i) % self.urls.len();
            let url = &self.urls[index];
            let watch = Arc::new(Watch {
                url: client::redacted(url),
                health: self.health.clone(),
                metrics: self.metrics.clone(),
                blocked: AtomicBool::new(false),
                state: AtomicU8::new(OPENING),
            });
            let mut options = self.options.clone();
            options.observer = watch.clone();
            let opening = Connection::open(url, &options);
            let why = match tokio::time::timeout(self.connect_timeout, opening).await {
                Ok(Ok(connection)) => {
                    watch.opened();
                    self.current.store(index, Ordering::Relaxed);
                    self.metrics.broker_connections_opened.inc();
                    if self.health.lost.swap(false, Ordering::Relaxed) {
                        self.metrics.broker_reconnects.inc();
                        tracing::info!(url = %watch.url, "AMQP connection opened again");
                    }
                    *lock(&self.health.failed) = None;
                    self.set_up(true);
                    return Ok(connection);
                }
                Ok(Err(BrokerError::Unavailable(why))) => why,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "no connection within amqp.connect_timeout ({:?}): TCP, TLS and login",
                    self.connect_timeout
                ),
            };
            self.metrics.broker_connect_failures.inc();
            self.log_failure(&watch.url, &why);
            failure = why;
        }
        *lock(&self.health.why) = failure.clone();
        *lock(&self.health.failed) = Some((Instant::now(), failure.clone()));
        self.set_up(false);
        Err(BrokerError::Unavailable(failure))
    }

    /// Logs a failed connection attempt, at most once per
    /// FAILURE_LOG_EVERY, saying how many were left out.
    fn log_failure(&self, url: &str, why: &str) {
        let mut logged = lock(&self.health.logged);
        if logged.is_some_and(|at| at.elapsed() < FAILURE_LOG_EVERY) {
            self.health.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *logged = Some(Instant::now());
        let unlogged = self.health.unlogged.swap(0, Ordering::Relaxed);
        tracing::warn!(%url, error = why, unlogged, "could not connect to the broker");
    }
}

impl Broker for AmqpBroker {
    type Session = AmqpSession;

    async fn open(&self, session_id: &str, acks: bool) -> Result<AmqpSession, BrokerError> {
        let queue = format!("stompgate.{}.{session_id}", self.node_id);
        let opening = async {
            let (connection, load) = self.share().await?;
            let channel = connection.channel().await?;
            let qos = basic::Qos {
                prefetch_count: self.prefetch,
                global: false,
            };
            channel
                .call(AMQPClass::Basic(basic::AMQPMethod::Qos(qos)))
                .await?;
            let select = confirm::Select { nowait: false };
            channel
                .call(AMQPClass::Confirm(confirm::AMQPMethod::Select(select)))
                .await?;
            // A client that stops reading cannot make its queue eat the
            // broker's memory.
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(self.queue_max_length)),
            );
            // Config::load checked that it fits.
            let max_bytes = i64::try_from(self.queue_max_bytes).unwrap_or(i64::MAX);
            arguments.insert(
                "x-max-length-bytes".into(),
                AMQPValue::LongLongInt(max_bytes),
            );
            arguments.insert(
                "x-overflow".into(),
                AMQPValue::LongString(self.queue_overflow.as_str().into()),
            );
            let declare = queue::Declare {
                queue: short(&queue)?,
                passive: false,
                durable: false,
                exclusive: true,
                auto_delete: true,
                nowait: false,
                arguments,
            };
            channel
                .call(AMQPClass::Queue(queue::AMQPMethod::Declare(declare)))
                .await
                .map_err(locked_is_transient)?;
            let consumer = consume(&channel, &queue, session_id, acks).await?;
            Ok::<_, BrokerError>((channel, consumer, load))
        };
        let (channel, consumer, load) = tokio::time::timeout(self.connect_timeout * 2, opening)
            .await
            .map_err(|_| BrokerError::Unavailable("timed out opening the session".into()))??;
        Ok(AmqpSession {
            channel,
            consumer,
            taken: VecDeque::new(),
            acks,
            behind: false,
            backlog_limit: usize::from(self.prefetch),
            window: self.prefetch,
            prefetch_bytes: self.prefetch_bytes,
            largest: 0,
            session_id: session_id.to_owned(),
            queue,
            call_timeout: self.options.call_timeout,
            _load: load,
        })
    }

    fn readiness(&self) -> Readiness {
        let health = &self.health;
        if health.blocked.load(Ordering::Relaxed) > 0 {
            return Readiness::Unavailable(lock(&health.why).clone());
        }
        match health.up.load(Ordering::Relaxed) {
            true => Readiness::Ready,
            false if health.tried.load(Ordering::Relaxed) => {
                Readiness::Unavailable(lock(&health.why).clone())
            }
            false => Readiness::Starting,
        }
    }

    async fn probe(&self) {
        let _ = self.share().await;
    }
}

/// A re-declared queue can meet `405 RESOURCE_LOCKED` when the broker has
/// not yet noticed that the connection which held it before (cut by a
/// network fault) is gone: that passes, so it is retried like an
/// unavailable broker, never fatal to the session.
fn locked_is_transient(error: BrokerError) -> BrokerError {
    match error {
        BrokerError::Refused(why) if why.starts_with("405") => BrokerError::Unavailable(format!(
            "the queue is still held by the connection the broker has not yet seen go ({why})"
        )),
        other => other,
    }
}

/// Starts the session's consumer, acknowledged or not, and returns its
/// tag; each kind has its own, as the acknowledged one may follow the
/// other on the channel.
async fn consume(
    channel: &Channel,
    queue: &str,
    session_id: &str,
    acks: bool,
) -> Result<String, BrokerError> {
    let tag = consumer_tag(session_id, acks)?;
    channel.consume(queue, &tag, !acks).await?;
    Ok(tag)
}

fn consumer_tag(session_id: &str, acks: bool) -> Result<String, BrokerError> {
    let tag = if acks {
        format!("stompgate.{session_id}.acked")
    } else {
        format!("stompgate.{session_id}")
    };
    short(&tag)?;
    Ok(tag)
}

pub struct AmqpSession {
    channel: Channel,
    /// The tag of the consumer deliveries are taken from.
    consumer: String,
    /// Deliveries taken from the channel in one go and not yet handed out:
    /// how many there were tells whether the session keeps up.
    taken: VecDeque<Result<Message, BrokerError>>,
    acks: bool,
    behind: bool,
    backlog_limit: usize,
    /// The prefetch with acks: amqp.prefetch, lowered so that a window of
    /// the largest message seen fits amqp.prefetch_bytes.
    window: u16,
    prefetch_bytes: usize,
    /// The largest delivery body seen.
    largest: usize,
    session_id: String,
    queue: String,
    /// How long a publish may wait for room in the connection's outbox.
    call_timeout: Duration,
    /// Counts this session on its connection until dropped.
    _load: Arc<()>,
}

/// A publisher confirm turned into the port's terms, without boxing.
pub type AmqpConfirm = Map<
    oneshot::Receiver<Result<Confirmed, BrokerError>>,
    fn(
        Result<Result<Confirmed, BrokerError>, oneshot::error::RecvError>,
    ) -> Result<Confirmed, BrokerError>,
>;

fn confirmed(
    result: Result<Result<Confirmed, BrokerError>, oneshot::error::RecvError>,
) -> Result<Confirmed, BrokerError> {
    result.unwrap_or_else(|_| {
        Err(BrokerError::Unavailable(
            "the connection ended before the broker confirmed".into(),
        ))
    })
}

impl BrokerSession for AmqpSession {
    type Confirm = AmqpConfirm;

    fn queue_name(&self) -> &str {
        &self.queue
    }

    async fn bind(&mut self, route: &Route) -> Result<(), BrokerError> {
        let bind = queue::Bind {
            queue: short(&self.queue)?,
            exchange: short(&route.exchange)?,
            routing_key: short(&route.key)?,
            nowait: false,
            arguments: FieldTable::default(),
        };
        self.channel
            .call(AMQPClass::Queue(queue::AMQPMethod::Bind(bind)))
            .await
            .map(drop)
    }

    async fn unbind(&mut self, route: &Route) -> Result<(), BrokerError> {
        let unbind = queue::Unbind {
            queue: short(&self.queue)?,
            exchange: short(&route.exchange)?,
            routing_key: short(&route.key)?,
            arguments: FieldTable::default(),
        };
        self.channel
            .call(AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)))
            .await
            .map(drop)
    }

    async fn publish(&mut self, message: &Publish) -> Result<AmqpConfirm, BrokerError> {
        let (properties, headers) = properties_from_stomp(&message.headers)?;
        short(&message.route.exchange)?;
        short(&message.route.key)?;
        // Sessions wait for room before they read the next SEND; this
        // covers the rest (republishing after a reconnect, a COMMIT).
        if !self.channel.writable() {
            let wait = self.call_timeout;
            if tokio::time::timeout(wait, self.channel.until_writable())
                .await
                .is_err()
            {
                return Err(BrokerError::Unavailable(format!(
                    "the broker read nothing for amqp.call_timeout ({wait:?}){}",
                    self.channel
                        .connection()
                        .blocked()
                        .map(|r| format!(": it blocks publishing ({r})"))
                        .unwrap_or_default()
                )));
            }
        }
        let confirm = self.channel.publish(
            &message.route.exchange,
            &message.route.key,
            properties,
            headers,
            &message.body,
        )?;
        Ok(confirm.map(confirmed as fn(_) -> _))
    }

    async fn next_delivery(&mut self) -> Option<Result<Delivery, BrokerError>> {
        if self.taken.is_empty() {
            // Cancel-safe: what was taken stays in `taken`.
            std::future::poll_fn(|cx| self.take(cx)).await;
        }
        if let Some(Ok(next)) = self.taken.front() {
            self.largest = self.largest.max(next.body.len());
            if self.acks {
                // Cancel-safe too: the delivery is taken after the call.
                if let Err(e) = self.fit_window().await {
                    return Some(Err(e));
                }
            }
        }
        let delivery = self.taken.pop_front()?;
        Some(delivery.map(|d| delivery_of(d, !self.acks)))
    }

    fn acks(&self) -> bool {
        self.acks
    }

    fn behind(&self) -> bool {
        self.behind
    }

    async fn require_acks(&mut self) -> Result<Vec<Delivery>, BrokerError> {
        if self.acks {
            return Ok(Vec::new());
        }
        // The new consumer first: the queue is auto-delete, and would go
        // with its last consumer. The broker takes both in order.
        let acked = consumer_tag(&self.session_id, true)?;
        // The new consumer's prefetch fits the largest message so far.
        self.largest = self
            .taken
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .map(|d| d.body.len())
            .fold(self.largest, usize::max);
        self.window = self.fitting();
        let qos = basic::Qos {
            prefetch_count: self.window,
            global: false,
        };
        self.channel
            .call(AMQPClass::Basic(basic::AMQPMethod::Qos(qos)))
            .await?;
        self.channel
            .replace_consumer(&self.queue, &acked, false, &self.consumer)
            .await?;
        let fast = std::mem::replace(&mut self.consumer, acked);
        // The broker sent cancel-ok after its last delivery to the old
        // consumer, and the reader handles frames in order: all of them
        // are in its queue now.
        let mut early = Vec::new();
        for delivery in self.taken.drain(..) {
            early.push(delivery_of(delivery?, true));
        }
        early.extend(
            self.channel
                .drain(&fast)
                .into_iter()
                .map(|d| delivery_of(d, true)),
        );
        self.acks = true;
        self.behind = false;
        // The queue shared its messages between both consumers meanwhile:
        // the channel's delivery tags give the order it sent them in.
        std::future::poll_fn(|cx| {
            let _ = self.take(cx);
            Poll::Ready(())
        })
        .await;
        for delivery in self.taken.drain(..) {
            early.push(delivery_of(delivery?, false));
        }
        early.sort_by_key(|d| d.tag);
        Ok(early)
    }

    async fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        self.channel.ack(tag, multiple)
    }

    async fn nack(&mut self, tag: u64, requeue: bool) -> Result<(), BrokerError> {
        self.channel.nack(tag, requeue)
    }

    fn writable(&self) -> bool {
        self.channel.writable()
    }

    fn cut_off(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.channel.cut_off()
    }

    fn until_writable(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.channel.until_writable()
    }

    async fn close(self) {
        if self.channel.connection().blocked().is_some() {
            // The broker reads nothing from a blocked connection: dropping
            // the channel queues its close (the exclusive, auto-delete
            // queue goes with it), and the session does not wait for it.
            return;
        }
        let closing = async {
            if self.channel.is_open() {
                if let Ok(queue) = short(&self.queue) {
                    let delete = queue::Delete {
                        queue,
                        if_unused: false,
                        if_empty: false,
                        nowait: false,
                    };
                    let _ = self
                        .channel
                        .call(AMQPClass::Queue(queue::AMQPMethod::Delete(delete)))
                        .await;
                }
                let _ = self.channel.close().await;
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
            tracing::warn!(queue = %self.queue, "closing the session's channel timed out");
        }
    }
}

impl AmqpSession {
    /// The prefetch that keeps a window of the largest message seen within
    /// half of amqp.prefetch_bytes (at least 1, at most amqp.prefetch):
    /// the session may hold what it is writing besides.
    fn fitting(&self) -> u16 {
        let fits = self.prefetch_bytes / 2 / self.largest.max(1);
        u16::try_from(fits)
            .unwrap_or(u16::MAX)
            .clamp(1, self.window)
    }

    /// Lowers the channel's prefetch when a larger message than before
    /// would make a window of them overrun amqp.prefetch_bytes (RabbitMQ
    /// applies a channel's `global` prefetch at once, beside the
    /// consumer's own). Never raised again: large messages come again.
    async fn fit_window(&mut self) -> Result<(), BrokerError> {
        let fits = self.fitting();
        if fits >= self.window {
            return Ok(());
        }
        self.window = fits;
        let qos = basic::Qos {
            prefetch_count: fits,
            global: true,
        };
        self.channel
            .call(AMQPClass::Basic(basic::AMQPMethod::Qos(qos)))
            .await
            .map(drop)
    }

    /// Takes what the channel holds for the consumer, up to the backlog
    /// limit; ready once something was taken or the consumer ended. How
    /// many there were tells whether the session keeps up.
    fn take(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let room = self.backlog_limit.saturating_sub(self.taken.len());
        if room == 0 {
            return Poll::Ready(());
        }
        let taking = self
            .channel
            .poll_take(cx, &self.consumer, &mut self.taken, room);
        // Without acks, half of amqp.prefetch_bytes waiting is behind
        // too: past the whole of it the channel is overrun.
        if self.taken.len() >= self.backlog_limit
            || self.channel.held_bytes() > self.prefetch_bytes / 2
        {
            self.behind |= !self.acks;
        }
        taking
    }
}

fn delivery_of(message: Message, settled: bool) -> Delivery {
    Delivery {
        tag: message.delivery_tag,
        settled,
        headers: stomp_headers_from(&message.properties),
        exchange: message.exchange.into(),
        routing_key: message.routing_key.into(),
        redelivered: message.redelivered,
        body: message.body,
    }
}

fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s)
        .map_err(|_| BrokerError::Invalid(format!("{s:?} is longer than AMQP's 255 bytes")))
}

/// SEND headers → AMQP properties (the contract's six, plus
/// `amqp-message-id`) and application headers for the rest. The first of
/// repeated headers wins, as in STOMP.
fn properties_from_stomp(
    headers: &[(String, String)],
) -> Result<(BasicProperties, FieldTable), BrokerError> {
    fn invalid(name: &str, value: &str, expected: &str) -> BrokerError {
        BrokerError::Invalid(format!("header {name}:{value} is not {expected}"))
    }
    let mut properties = BasicProperties::default();
    let mut table = FieldTable::default();
    let mut seen: Vec<&str> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if reserved(name) || seen.contains(&name.as_str()) {
            continue;
        }
        seen.push(name);
        properties = match name.as_str() {
            "content-type" => properties.with_content_type(short(value)?),
            "persistent" => match value.as_str() {
                "true" => properties.with_delivery_mode(2),
                "false" => properties.with_delivery_mode(1),
                _ => return Err(invalid(name, value, "true or false")),
            },
            "priority" => properties.with_priority(
                value
                    .parse()
                    .map_err(|_| invalid(name, value, "a number from 0 to 255"))?,
            ),
            "expiration" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(name, value, "a time to live in milliseconds"));
                }
                properties.with_expiration(short(value)?)
            }
            "reply-to" => properties.with_reply_to(short(value)?),
            "correlation-id" => properties.with_correlation_id(short(value)?),
            "amqp-message-id" => properties.with_message_id(short(value)?),
            _ => {
                table.insert(
                    short(name)?,
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
                properties
            }
        };
    }
    Ok((properties, table))
}

/// AMQP properties and headers → STOMP headers on MESSAGE, the reverse of
/// [`properties_from_stomp`], so messages from any AMQP client read well.
fn stomp_headers_from(properties: &BasicProperties) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    let mut put = |name: &str, value: String| headers.push((name.to_owned(), value));
    if let Some(v) = properties.content_type() {
        put("content-type", v.to_string());
    }
    if let Some(mode) = properties.delivery_mode() {
        put("persistent", (*mode == 2).to_string());
    }
    if let Some(v) = properties.priority() {
        put("priority", v.to_string());
    }
    if let Some(v) = properties.expiration() {
        put("expiration", v.to_string());
    }
    if let Some(v) = properties.reply_to() {
        put("reply-to", v.to_string());
    }
    if let Some(v) = properties.correlation_id() {
        put("correlation-id", v.to_string());
    }
    if let Some(v) = properties.message_id() {
        put("amqp-message-id", v.to_string());
    }
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            if reserved(name.as_str()) {
                continue;
            }
            if let Some(text) = value_text(value) {
                put(name.as_str(), text);
            }
        }
    }
    headers
}

/// A header value as text; nested tables and arrays have no STOMP form.
fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}
