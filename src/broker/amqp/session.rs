//! One STOMP session's side of RabbitMQ: its channel, exclusive queue and
//! consumer (without acks while the session keeps up, with acks and a
//! prefetch fitted to amqp.prefetch_bytes once it needs them), its
//! bindings, and its publishes with their confirms.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use amq_protocol::protocol::{basic, queue, AMQPClass};
use amq_protocol::types::FieldTable;
use futures_util::future::Map;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::client::{Channel, Message};
use super::headers::{properties_from_stomp, short, stomp_headers_from};
use crate::broker::{BrokerError, BrokerSession, Confirmed, Delivery, Publish};
use crate::destination::Route;

/// Bounds the queue deletion and channel close at session end, so a dead
/// broker cannot hold a session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the session's consumer, acknowledged or not, and returns its
/// tag; each kind has its own, as the acknowledged one may follow the
/// other on the channel.
pub(super) async fn consume(
    channel: &Channel,
    queue: &str,
    session_id: &str,
    acks: bool,
) -> Result<String, BrokerError> {
    let tag = consumer_tag(session_id, acks)?;
    channel.consume(queue, &tag, !acks).await?;
    Ok(tag)
}

pub(super) fn consumer_tag(session_id: &str, acks: bool) -> Result<String, BrokerError> {
    let tag = if acks {
        format!("stompgate.{session_id}.acked")
    } else {
        format!("stompgate.{session_id}")
    };
    short(&tag)?;
    Ok(tag)
}

pub struct AmqpSession {
    pub(super) channel: Channel,
    /// The tag of the consumer deliveries are taken from.
    pub(super) consumer: String,
    /// Deliveries taken from the channel in one go and not yet handed out:
    /// how many there were tells whether the session keeps up.
    pub(super) taken: VecDeque<Result<Message, BrokerError>>,
    pub(super) acks: bool,
    pub(super) behind: bool,
    pub(super) backlog_limit: usize,
    /// The prefetch with acks: amqp.prefetch, lowered so that a window of
    /// the largest message seen fits amqp.prefetch_bytes.
    pub(super) window: u16,
    pub(super) prefetch_bytes: usize,
    /// The largest delivery body seen.
    pub(super) largest: usize,
    pub(super) session_id: String,
    pub(super) queue: String,
    /// How long a publish may wait for room in the connection's outbox.
    pub(super) call_timeout: Duration,
    /// The gateway's AMQP users: a delivery published as one of them
    /// keeps its sender headers.
    pub(super) trusted: Arc<[String]>,
    /// Counts this session on its connection until dropped.
    pub(super) _load: Arc<()>,
}

/// A publisher confirm turned into the port's terms, without boxing.
pub type AmqpConfirm = Map<
    oneshot::Receiver<Result<Confirmed, BrokerError>>,
    fn(
        Result<Result<Confirmed, BrokerError>, oneshot::error::RecvError>,
    ) -> Result<Confirmed, BrokerError>,
>;

pub(super) fn confirmed(
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
        let amqp_user = self.channel.connection().user();
        let sender = message.sender.as_deref().map(|s| (s, amqp_user));
        let (properties, headers) = properties_from_stomp(&message.headers, sender)?;
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
        Some(delivery.map(|d| delivery_of(d, !self.acks, &self.trusted)))
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
            early.push(delivery_of(delivery?, true, &self.trusted));
        }
        early.extend(
            self.channel
                .drain(&fast)
                .into_iter()
                .map(|d| delivery_of(d, true, &self.trusted)),
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
            early.push(delivery_of(delivery?, false, &self.trusted));
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

pub(super) fn delivery_of(message: Message, settled: bool, trusted: &[String]) -> Delivery {
    Delivery {
        tag: message.delivery_tag,
        settled,
        headers: stomp_headers_from(&message.properties, trusted),
        exchange: message.exchange.into(),
        routing_key: message.routing_key.into(),
        redelivered: message.redelivered,
        body: message.body,
    }
}
