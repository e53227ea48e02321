//! RabbitMQ behind the broker port, with lapin and a deadpool-lapin pool.
//!
//! Each session gets its own AMQP channel on a pooled connection, and on it
//! one queue `stompgate.<node-id>.<session-id>` (exclusive, auto-delete,
//! bounded length), consumed without acks while the session keeps up and
//! with acks and a prefetch once it needs them; publisher confirms on.
//! One pool per broker URL: when one broker cannot give a connection, the
//! next is tried. Connections taken from the pools are shared: a session
//! opens its channel on the first one with room, and a new connection is
//! taken once each carries `amqp.sessions_per_connection` channels, so the
//! pool grows with the sessions and no connection nears RabbitMQ's
//! `channel_max` (2047).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use deadpool_lapin::{Hook, Pool, PoolConfig, Runtime, Timeouts};
use futures_util::future::Map;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ConnectionProperties, Consumer};

use super::{Acked, Broker, BrokerError, BrokerSession, Delivery, Publish};
use crate::config::{AmqpConfig, Overflow};
use crate::destination::Route;
use crate::metrics::Metrics;

/// STOMP headers that describe the frame itself, not the message: they
/// never travel to RabbitMQ.
const STOMP_OWN_HEADERS: [&str; 9] = [
    STAMP_HEADER,
    "destination",
    "receipt",
    "transaction",
    "content-length",
    "message-id",
    "subscription",
    "ack",
    "redelivered",
];

/// Identifies a session's publish in a message the broker returns (see
/// [`super::Acked`]). Never shown to STOMP clients.
const STAMP_HEADER: &str = "x-stompgate-stamp";

/// Bounds the queue deletion and channel close at session end, and the
/// wait for a cancelled consumer's end, so a dead broker cannot hold a
/// session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AmqpBroker {
    /// One per broker URL, in config order.
    pools: Arc<[Pool]>,
    /// The pool that gave the last good connection: tried first.
    current: Arc<AtomicUsize>,
    /// Connections taken from the pools, shared by sessions.
    held: Arc<tokio::sync::Mutex<Vec<Held>>>,
    sessions_per_connection: usize,
    pool_size: usize,
    health: Arc<Health>,
    node_id: String,
    prefetch: u16,
    queue_max_length: u32,
    queue_overflow: Overflow,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// A pooled connection and its load: every session on it holds a clone
/// of `load`, so the strong count less one is its number of channels.
struct Held {
    connection: Arc<deadpool_lapin::Object>,
    load: Arc<()>,
}

impl Held {
    fn sessions(&self) -> usize {
        Arc::strong_count(&self.load) - 1
    }
}

/// Whether the broker answered lately, and whether a connection was lost
/// since the last one was opened (so the next opening is a reconnect).
struct Health {
    up: AtomicBool,
    lost: AtomicBool,
}

impl AmqpBroker {
    /// Prepares the pools; connections are opened on first use, so the
    /// gateway starts (and `/readyz` says 503) while RabbitMQ is down.
    pub fn new(
        config: &AmqpConfig,
        node_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<AmqpBroker, BrokerError> {
        let health = Arc::new(Health {
            up: AtomicBool::new(true),
            lost: AtomicBool::new(false),
        });
        let pools = config
            .all_urls()
            .map(|url| Self::pool(config, url, node_id, &metrics, &health))
            .collect::<Result<Vec<Pool>, BrokerError>>()?;
        Ok(AmqpBroker {
            pools: pools.into(),
            current: Arc::new(AtomicUsize::new(0)),
            held: Arc::new(tokio::sync::Mutex::new(Vec::new())),
            sessions_per_connection: config.sessions_per_connection,
            pool_size: config.pool_size,
            health,
            node_id: node_id.to_owned(),
            prefetch: config.prefetch,
            queue_max_length: config.queue_max_length,
            queue_overflow: config.queue_overflow,
            connect_timeout: config.connect_timeout,
            metrics,
        })
    }

    fn pool(
        config: &AmqpConfig,
        url: &str,
        node_id: &str,
        metrics: &Metrics,
        health: &Arc<Health>,
    ) -> Result<Pool, BrokerError> {
        let name = format!("stompgate {node_id}");
        let pool_config = deadpool_lapin::Config {
            url: Some(url.to_owned()),
            pool: Some(PoolConfig {
                max_size: config.pool_size,
                timeouts: Timeouts {
                    wait: Some(config.connect_timeout),
                    create: Some(config.connect_timeout),
                    recycle: Some(config.connect_timeout),
                },
                ..PoolConfig::default()
            }),
        };
        let opened = metrics.broker_connections_opened.clone();
        let reconnects = metrics.broker_reconnects.clone();
        let health = health.clone();
        pool_config
            .builder(
                move || ConnectionProperties::default().with_connection_name(name.clone().into()),
                Runtime::Tokio1,
            )
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?
            .post_create(Hook::sync_fn(move |_, _| {
                opened.inc();
                if health.lost.swap(false, Ordering::Relaxed) {
                    reconnects.inc();
                }
                Ok(())
            }))
            .build()
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    fn set_up(&self, up: bool) {
        self.health.up.store(up, Ordering::Relaxed);
        if !up {
            self.health.lost.store(true, Ordering::Relaxed);
        }
        self.metrics.broker_up.set(i64::from(up));
    }

    /// A connection for one more session: the first live one held that
    /// carries fewer than `amqp.sessions_per_connection`, else a new one
    /// from the pools (or, past what they give, the least loaded). Packing
    /// sessions onto the fewest connections matters: each connection has
    /// its own I/O thread, and a fan-out spread over two costs more CPU per
    /// delivery than on one. Returns the session's share of the load.
    async fn share(&self) -> Result<(Arc<deadpool_lapin::Object>, Arc<()>), BrokerError> {
        let mut held = self.held.lock().await;
        // A lost connection goes back to its pool, which discards it.
        held.retain(|h| h.connection.status().connected());
        let room = held
            .iter()
            .position(|h| h.sessions() < self.sessions_per_connection);
        let index = match room {
            Some(index) => Some(index),
            None if held.len() < self.pool_size * self.pools.len() => {
                match self.connection().await {
                    Ok(connection) => {
                        held.push(Held {
                            connection: Arc::new(connection),
                            load: Arc::new(()),
                        });
                        Some(held.len() - 1)
                    }
                    Err(e) if held.is_empty() => return Err(e),
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
                .min_by_key(|h| h.sessions())
                .ok_or_else(|| BrokerError::Unavailable("no broker connection".into()))?,
        };
        self.set_up(true);
        Ok((h.connection.clone(), h.load.clone()))
    }

    /// A live pooled connection, from the broker that gave the last one or
    /// else the next in turn; whether one could be had sets `broker_up`.
    async fn connection(&self) -> Result<deadpool_lapin::Connection, BrokerError> {
        let first = self.current.load(Ordering::Relaxed);
        let mut failure = String::from("no broker configured");
        for i in 0..self.pools.len() {
            let index = (first + i) % self.pools.len();
            match self.pools[index].get().await {
                Ok(connection) if connection.status().connected() => {
                    self.current.store(index, Ordering::Relaxed);
                    self.set_up(true);
                    return Ok(connection);
                }
                Ok(connection) => failure = format!("connection {:?}", connection.status()),
                Err(e) => failure = e.to_string(),
            }
        }
        self.set_up(false);
        Err(BrokerError::Unavailable(failure))
    }
}

impl Broker for AmqpBroker {
    type Session = AmqpSession;

    async fn open(&self, session_id: &str, acks: bool) -> Result<AmqpSession, BrokerError> {
        let queue = format!("stompgate.{}.{session_id}", self.node_id);
        let opening = async {
            let (connection, load) = self.share().await?;
            let channel = connection.create_channel().await.map_err(classify)?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await
                .map_err(classify)?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(classify)?;
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            // A client that stops reading cannot make its queue eat the
            // broker's memory.
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(self.queue_max_length)),
            );
            arguments.insert(
                "x-overflow".into(),
                AMQPValue::LongString(self.queue_overflow.as_str().into()),
            );
            channel
                .queue_declare(short(&queue)?, options, arguments)
                .await
                .map_err(classify)?;
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
            session_id: session_id.to_owned(),
            queue,
            _load: load,
        })
    }

    async fn ready(&self) -> bool {
        let live = {
            let held = self.held.lock().await;
            held.iter().any(|h| h.connection.status().connected())
        };
        live || self.share().await.is_ok()
    }

    fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Relaxed)
    }
}

/// Starts the session's consumer, acknowledged or not; each kind has its
/// own tag, as the acknowledged one may follow the other on the channel.
async fn consume(
    channel: &Channel,
    queue: &str,
    session_id: &str,
    acks: bool,
) -> Result<Consumer, BrokerError> {
    let tag = if acks {
        format!("stompgate.{session_id}.acked")
    } else {
        format!("stompgate.{session_id}")
    };
    let options = BasicConsumeOptions {
        no_ack: !acks,
        ..BasicConsumeOptions::default()
    };
    channel
        .basic_consume(short(queue)?, short(&tag)?, options, FieldTable::default())
        .await
        .map_err(classify)
}

pub struct AmqpSession {
    channel: Channel,
    consumer: Consumer,
    /// Deliveries taken from lapin in one go and not yet handed out: how
    /// many there were tells whether the session keeps up.
    taken: VecDeque<lapin::Result<lapin::message::Delivery>>,
    acks: bool,
    behind: bool,
    backlog_limit: usize,
    session_id: String,
    queue: String,
    /// Counts this session on its connection until dropped.
    _load: Arc<()>,
}

/// A publisher confirm turned into the port's terms, without boxing.
pub type AmqpConfirm =
    Map<lapin::PublisherConfirm, fn(lapin::Result<Confirmation>) -> Result<Acked, BrokerError>>;

fn confirmed(result: lapin::Result<Confirmation>) -> Result<Acked, BrokerError> {
    match result.map_err(classify)? {
        Confirmation::Ack(returned) => Ok(Acked {
            carried_return: returned.and_then(|r| stamp_of(&r.delivery.properties)),
        }),
        Confirmation::Nack(_) => Err(BrokerError::Nacked),
        Confirmation::NotRequested => Err(BrokerError::Refused(
            "publisher confirms are not enabled on the channel".into(),
        )),
    }
}

impl BrokerSession for AmqpSession {
    type Confirm = AmqpConfirm;

    fn queue_name(&self) -> &str {
        &self.queue
    }

    async fn bind(&mut self, route: &Route) -> Result<(), BrokerError> {
        self.channel
            .queue_bind(
                short(&self.queue)?,
                short(&route.exchange)?,
                short(&route.key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(classify)
    }

    async fn unbind(&mut self, route: &Route) -> Result<(), BrokerError> {
        self.channel
            .queue_unbind(
                short(&self.queue)?,
                short(&route.exchange)?,
                short(&route.key)?,
                FieldTable::default(),
            )
            .await
            .map_err(classify)
    }

    async fn publish(&mut self, message: &Publish, stamp: u64) -> Result<AmqpConfirm, BrokerError> {
        let properties = properties_from_stomp(&message.headers, stamp)?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                short(&message.route.exchange)?,
                short(&message.route.key)?,
                options,
                &message.body,
                properties,
            )
            .await
            .map_err(classify)?;
        Ok(confirm.map(confirmed as fn(_) -> _))
    }

    async fn next_delivery(&mut self) -> Option<Result<Delivery, BrokerError>> {
        if self.taken.is_empty() {
            // Cancel-safe: what was taken stays in `taken`.
            std::future::poll_fn(|cx| self.take(cx)).await;
        }
        let delivery = self.taken.pop_front()?;
        Some(
            delivery
                .map_err(classify)
                .map(|d| delivery_of(d, !self.acks)),
        )
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
        // with its last consumer.
        let acked = consume(&self.channel, &self.queue, &self.session_id, true).await?;
        let mut fast = std::mem::replace(&mut self.consumer, acked);
        self.channel
            .basic_cancel(fast.tag(), BasicCancelOptions::default())
            .await
            .map_err(classify)?;
        // The broker sent cancel-ok after its last delivery to the old
        // consumer, and lapin handles frames in order: all of them are in
        // its stream now, and then its end.
        let mut early = Vec::new();
        for delivery in self.taken.drain(..) {
            early.push(delivery_of(delivery.map_err(classify)?, true));
        }
        let rest = tokio::time::timeout(CLOSE_TIMEOUT, fast.by_ref().collect::<Vec<_>>())
            .await
            .map_err(|_| BrokerError::Unavailable("the cancelled consumer did not end".into()))?;
        for delivery in rest {
            early.push(delivery_of(delivery.map_err(classify)?, true));
        }
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
            early.push(delivery_of(delivery.map_err(classify)?, false));
        }
        early.sort_by_key(|d| d.tag);
        Ok(early)
    }

    async fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(classify)
    }

    async fn nack(&mut self, tag: u64, requeue: bool) -> Result<(), BrokerError> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        self.channel
            .basic_nack(tag, options)
            .await
            .map_err(classify)
    }

    async fn close(self) {
        let closing = async {
            if self.channel.status().connected() {
                if let Ok(queue) = short(&self.queue) {
                    let _ = self
                        .channel
                        .queue_delete(queue, QueueDeleteOptions::default())
                        .await;
                }
                let _ = self.channel.close(200, "session closed".into()).await;
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
            tracing::warn!(queue = %self.queue, "closing the session's channel timed out");
        }
    }
}

impl AmqpSession {
    /// Takes everything lapin holds for the consumer, up to the backlog
    /// limit; ready once something was taken or the consumer ended. How
    /// many there were tells whether the session keeps up.
    fn take(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.taken.len() >= self.backlog_limit {
                self.behind |= !self.acks;
                return Poll::Ready(());
            }
            match self.consumer.poll_next_unpin(cx) {
                Poll::Ready(Some(delivery)) => self.taken.push_back(delivery),
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending if self.taken.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(()),
            }
        }
    }
}

fn delivery_of(delivery: lapin::message::Delivery, settled: bool) -> Delivery {
    Delivery {
        tag: delivery.delivery_tag,
        settled,
        headers: stomp_headers_from(&delivery.properties),
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        redelivered: delivery.redelivered,
        body: Bytes::from(delivery.data),
    }
}

/// Sorts lapin's errors into the port's: a channel-level error from the
/// broker (NOT_FOUND, ACCESS_REFUSED, PRECONDITION_FAILED…) was caused by
/// what the client asked for; anything else means the broker is gone.
fn classify(e: lapin::Error) -> BrokerError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) =>
        {
            BrokerError::Refused(amqp.to_string())
        }
        _ => BrokerError::Unavailable(e.to_string()),
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
    stamp: u64,
) -> Result<BasicProperties, BrokerError> {
    fn invalid(name: &str, value: &str, expected: &str) -> BrokerError {
        BrokerError::Invalid(format!("header {name}:{value} is not {expected}"))
    }
    let mut properties = BasicProperties::default();
    let mut table = FieldTable::default();
    let mut seen: Vec<&str> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if STOMP_OWN_HEADERS.contains(&name.as_str()) || seen.contains(&name.as_str()) {
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
    table.insert(STAMP_HEADER.into(), AMQPValue::LongLongInt(stamp as i64));
    Ok(properties.with_headers(table))
}

fn stamp_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(STAMP_HEADER)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
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
            if STOMP_OWN_HEADERS.contains(&name.as_str()) {
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
