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
mod headers;
mod session;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, confirm, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use amq_protocol::uri::AMQPUri;

use super::{Broker, BrokerError, Readiness};
use crate::budget::Budget;
use crate::config::{AmqpConfig, Overflow};
use crate::metrics::Metrics;
use client::{Connection, Holding, Options};
use headers::short;
use session::consume;
pub use session::{AmqpConfirm, AmqpSession};

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
    /// The users those URLs log in as: messages published as one of them
    /// came from a gateway (see [`headers::stomp_headers_from`]).
    trusted: Arc<[String]>,
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
    /// `amqp.direct_exchange`, declared by every session.
    direct_exchange: String,
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
        let mut trusted = Vec::new();
        for url in &urls {
            let uri: AMQPUri = url.parse().map_err(BrokerError::Invalid)?;
            let user = uri.authority.userinfo.username;
            if !trusted.contains(&user) {
                trusted.push(user);
            }
        }
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
            trusted: trusted.into(),
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
            direct_exchange: config.direct_exchange.clone(),
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
            // Addressed messages (`/user/…`, `/session/…`) go through it;
            // declared by each session, as a broker may have lost it.
            let direct = exchange::Declare {
                exchange: short(&self.direct_exchange)?,
                kind: "direct".into(),
                passive: false,
                durable: true,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments: FieldTable::default(),
            };
            channel
                .call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(direct)))
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
            trusted: self.trusted.clone(),
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
