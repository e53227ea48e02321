//! [`Channel`], a session's handle on one channel: synchronous calls
//! checked against their replies, consumers and taking their deliveries,
//! publishes with confirms, acks, flow and the close.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{basic, channel, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::{BufMut, BytesMut};
use tokio::sync::oneshot;

use crate::broker::{BrokerError, Confirmed};

use super::frames::{
    close_method, method_name, put_short_string, CLASS_BASIC, FRAME_BODY, FRAME_END, FRAME_HEAD,
};
use super::{
    lock, ChannelShared, Connection, ConsumerQueue, Message, Pending, Phase, Waiting, STAMP_HEADER,
};

/// One channel, used by one session.
pub struct Channel {
    pub(super) connection: Connection,
    pub(super) shared: Arc<ChannelShared>,
}

impl Channel {
    /// Bytes of this channel's deliveries the gateway holds.
    pub fn held_bytes(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Resolves when the node, over its budget of deliveries, cut this
    /// stalled channel off: its session should end at once, even in the
    /// middle of a write its client is not reading, to give back what
    /// it holds.
    pub fn cut_off(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.cut.clone().cancelled_owned()
    }

    pub fn is_open(&self) -> bool {
        self.connection.is_open() && lock(&self.shared.state).closed.is_none()
    }

    /// The connection the channel is on.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Whether a publish may be queued now: the outbox is under its
    /// high-water mark and the broker has not paused the channel's flow.
    /// Also true once the connection has ended, so that the caller goes on
    /// and meets the error (a failed channel shows in its deliveries).
    pub fn writable(&self) -> bool {
        writable(&self.connection, &self.shared)
    }

    /// Resolves once [`Channel::writable`]. Cancel-safe, and borrows
    /// nothing, so a session can wait for it beside its other events.
    pub fn until_writable(&self) -> impl Future<Output = ()> + Send + 'static {
        let connection = self.connection.clone();
        let shared = self.shared.clone();
        async move {
            loop {
                let drained = connection.inner.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if writable(&connection, &shared) {
                    return;
                }
                drained.await;
            }
        }
    }

    /// Sends a synchronous method and waits, at most the connection's call
    /// timeout, for the broker's reply. Past it the channel is given up:
    /// what the broker did with the method is unknown.
    pub async fn call(&self, method: AMQPClass) -> Result<AMQPClass, BrokerError> {
        let what = method_name(&method);
        let reply = self.request(method)?;
        let inner = &self.connection.inner;
        match tokio::time::timeout(inner.call_timeout, reply).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(inner.failure()),
            Err(_) => {
                let why = format!(
                    "the broker did not answer {what} within amqp.call_timeout ({:?}){}",
                    inner.call_timeout,
                    self.connection
                        .blocked()
                        .map(|r| format!("; it blocks the connection: {r}"))
                        .unwrap_or_default()
                );
                inner.abandon(&self.shared, why.clone());
                Err(BrokerError::Unavailable(why))
            }
        }
    }

    /// Sends a synchronous method; the receiver gets the reply.
    pub(super) fn request(
        &self,
        method: AMQPClass,
    ) -> Result<oneshot::Receiver<Result<AMQPClass, BrokerError>>, BrokerError> {
        let (done, reply) = oneshot::channel();
        // Every synchronous method the gateway sends is answered by the
        // method numbered one above it (open → open-ok, bind → bind-ok…).
        let expects = (method.get_amqp_class_id(), method.get_amqp_method_id() + 1);
        let closing = matches!(method, AMQPClass::Channel(channel::AMQPMethod::Close(_)));
        let mut state = lock(&self.shared.state);
        if let Some(closed) = &state.closed {
            return Err(closed.clone());
        }
        self.connection
            .inner
            .send(|o| o.method(self.shared.id, method))?;
        state.phase = if closing { Phase::Closing } else { Phase::Open };
        state.replies.push_back(Waiting { expects, done });
        Ok(reply)
    }

    /// Starts a consumer whose deliveries [`Channel::poll_take`] hands out.
    pub async fn consume(&self, queue: &str, tag: &str, no_ack: bool) -> Result<(), BrokerError> {
        self.call(self.consumer(queue, tag, no_ack)).await.map(drop)
    }

    /// Starts consumer `tag` and cancels consumer `old` in one go: both
    /// methods leave before either reply comes (RabbitMQ handles a
    /// channel's methods in order), so the old consumer stops getting
    /// messages one round trip sooner than if the cancel waited for the
    /// consume's reply, behind whatever deliveries the broker was sending.
    /// Once this returns, every delivery `old` had was received:
    /// [`Channel::drain`] gives them.
    pub async fn replace_consumer(
        &self,
        queue: &str,
        tag: &str,
        no_ack: bool,
        old: &str,
    ) -> Result<(), BrokerError> {
        let inner = &self.connection.inner;
        let started = self.request(self.consumer(queue, tag, no_ack))?;
        let cancel = basic::Cancel {
            consumer_tag: old.into(),
            nowait: false,
        };
        let cancelled = self.request(AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)))?;
        let both = async {
            for reply in [started, cancelled] {
                reply.await.map_err(|_| inner.failure())??;
            }
            Ok(())
        };
        match tokio::time::timeout(inner.call_timeout, both).await {
            Ok(result) => result,
            Err(_) => {
                let why = format!(
                    "the broker did not answer basic.consume within amqp.call_timeout ({:?})",
                    inner.call_timeout
                );
                inner.abandon(&self.shared, why.clone());
                Err(BrokerError::Unavailable(why))
            }
        }
    }

    /// A basic.consume for `tag`, whose deliveries are kept from now on.
    pub(super) fn consumer(&self, queue: &str, tag: &str, no_ack: bool) -> AMQPClass {
        let tag = ShortString::from(tag);
        lock(&self.shared.state).consumers.push(ConsumerQueue {
            tag: tag.clone(),
            messages: VecDeque::new(),
            ended: false,
        });
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: tag,
            no_local: false,
            no_ack,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        }))
    }

    /// The deliveries consumer `tag` holds, which stops being tracked.
    pub fn drain(&self, tag: &str) -> VecDeque<Message> {
        let mut state = lock(&self.shared.state);
        match state.consumers.iter().position(|c| c.tag.as_str() == tag) {
            Some(i) => state.consumers.remove(i).messages,
            None => VecDeque::new(),
        }
    }

    /// Moves up to `limit` deliveries of consumer `tag` into `into`. Ready
    /// when it moved some, or when nothing more will come: the consumer
    /// ended (nothing moved) or the channel failed (an error moved).
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        tag: &str,
        into: &mut VecDeque<Result<Message, BrokerError>>,
        limit: usize,
    ) -> Poll<()> {
        let mut state = lock(&self.shared.state);
        state.last_take = Some(Instant::now());
        let closed = state.closed.clone();
        let Some(consumer) = state.consumers.iter_mut().find(|c| c.tag.as_str() == tag) else {
            return Poll::Ready(());
        };
        let n = consumer.messages.len().min(limit);
        into.extend(consumer.messages.drain(..n).map(Ok));
        if n > 0 || consumer.ended {
            return Poll::Ready(());
        }
        if let Some(error) = closed {
            into.push_back(Err(error));
            return Poll::Ready(());
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Publishes `mandatory` with `headers` (and its [`STAMP_HEADER`]);
    /// the receiver gets the broker's confirm: routed, returned or nacked.
    /// Never waits: callers hold publishes back until
    /// [`Channel::writable`], so a broker that stops reading holds the
    /// sessions back rather than their messages piling up here.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        mut headers: FieldTable,
        body: &[u8],
    ) -> Result<oneshot::Receiver<Result<Confirmed, BrokerError>>, BrokerError> {
        let inner = &self.connection.inner;
        let (done, confirmed) = oneshot::channel();
        let id = self.shared.id;
        let mut state = lock(&self.shared.state);
        if let Some(closed) = &state.closed {
            return Err(closed.clone());
        }
        let seq = state.next_seq;
        headers.insert(STAMP_HEADER.into(), AMQPValue::LongLongInt(seq as i64));
        let properties = properties.with_headers(headers);
        let mut too_large = false;
        inner.send(|o| {
            let start = o.bytes.len();
            o.raw_method(id, 40, |b| {
                b.put_u16(0);
                put_short_string(b, exchange);
                put_short_string(b, routing_key);
                b.put_u8(1); // mandatory
            });
            let header_at = o.bytes.len();
            o.frame(&AMQPFrame::Header(
                id,
                AMQPContentHeader {
                    class_id: CLASS_BASIC,
                    body_size: body.len() as u64,
                    properties,
                },
            ));
            // The broker would close the whole connection for it.
            if o.bytes.len() - header_at > inner.frame_max {
                o.bytes.truncate(start);
                too_large = true;
                return;
            }
            let chunk = inner.frame_max - FRAME_HEAD - 1;
            for part in body.chunks(chunk) {
                let b = &mut o.bytes;
                b.reserve(part.len() + FRAME_HEAD + 1);
                b.put_u8(FRAME_BODY);
                b.put_u16(id);
                b.put_u32(part.len() as u32);
                b.put_slice(part);
                b.put_u8(FRAME_END);
            }
        })?;
        if too_large {
            return Err(BrokerError::Invalid(format!(
                "the headers do not fit in one AMQP frame ({} bytes)",
                inner.frame_max
            )));
        }
        state.next_seq += 1;
        state.confirms.push_back(Pending { seq, done });
        Ok(confirmed)
    }

    /// Acknowledges a delivery. Acks never wait for room: they are small,
    /// and they are what lets the broker send more.
    pub fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        self.basic(80, |b| {
            b.put_u64(tag);
            b.put_u8(u8::from(multiple));
        })
    }

    pub fn nack(&self, tag: u64, requeue: bool) -> Result<(), BrokerError> {
        self.basic(120, |b| {
            b.put_u64(tag);
            b.put_u8(u8::from(requeue) << 1);
        })
    }

    pub(super) fn basic(
        &self,
        method: u16,
        args: impl FnOnce(&mut BytesMut),
    ) -> Result<(), BrokerError> {
        let state = lock(&self.shared.state);
        if let Some(closed) = &state.closed {
            return Err(closed.clone());
        }
        self.connection
            .inner
            .send(|o| o.raw_method(self.shared.id, method, args))
    }

    /// Closes the channel and waits for the broker to agree.
    pub async fn close(&self) -> Result<(), BrokerError> {
        self.call(close_method("session closed")).await.map(drop)
    }
}

impl Drop for Channel {
    /// A channel dropped without [`Channel::close`] (its session's task
    /// was aborted, or its opening timed out) is closed without waiting
    /// if the broker knows of it; its id is free once the broker's
    /// close-ok comes. One whose open never went out is simply let go.
    fn drop(&mut self) {
        let inner = &self.connection.inner;
        let mut state = lock(&self.shared.state);
        match state.phase {
            Phase::Open => {
                state.phase = Phase::Closing;
                state.fail(BrokerError::Unavailable("channel dropped".into()));
                let id = self.shared.id;
                let _ = inner.send(|o| o.method(id, close_method("session ended")));
            }
            Phase::Unopened => {
                state.phase = Phase::Closed;
                drop(state);
                inner.free(self.shared.id);
            }
            Phase::Closing | Phase::Closed => {}
        }
    }
}

/// See [`Channel::writable`]: two atomic loads, no lock.
pub(super) fn writable(connection: &Connection, channel: &ChannelShared) -> bool {
    !connection.is_open()
        || (!channel.paused.load(Ordering::Relaxed) && connection.inner.has_room())
}
