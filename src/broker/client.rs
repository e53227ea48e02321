//! A small AMQP 0-9-1 client that runs on the gateway's own tokio runtime.
//!
//! Why not lapin, which this replaced: lapin drives every connection from an
//! OS thread of its own, so each delivery and each publish crossed from that
//! thread to a session's task and back. At partial load both sleep between
//! messages, and a profile of the gateway at 500 msg/s spent a fifth of its
//! samples switching between them. Here a connection is two
//! tasks on the session runtime: a reader that parses frames and hands each
//! channel its deliveries, confirms and replies, and a writer that flushes
//! what the sessions queued. A message goes from the broker's socket to the
//! client's on the runtime's own threads.
//!
//! Only what the gateway uses is here: PLAIN login, heart-beats, channels
//! with synchronous methods, publisher confirms with `mandatory` returns,
//! and consumers. amq-protocol (lapin's own codec)
//! parses and encodes the methods and properties; the few hot frames
//! (publish, ack, nack, bodies) are encoded by hand.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{wire, BrokerError, Confirmed};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size: what precedes every frame's payload.
const FRAME_HEAD: usize = 7;
const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";
const CLASS_BASIC: u16 = 60;

/// Numbers each publish (its confirm sequence number) in a header, so
/// that a message the broker returns is matched to its publish: a return
/// comes before its own confirm, but not always before others'. The
/// adapter keeps it from STOMP clients.
pub const STAMP_HEADER: &str = "x-stompgate-stamp";

/// RabbitMQ's default, and the most this client asks for: bodies larger
/// than a frame go in several.
const FRAME_MAX: u32 = 131_072;
const CHANNEL_MAX: u16 = 2047;
/// Past this many bytes queued for the broker, senders wait for the writer:
/// a broker that stops reading (a memory alarm) holds the sessions back
/// rather than their frames piling up here.
const OUTBOX_HIGH_WATER: usize = 4 << 20;
/// How long a closing connection waits for the broker's close-ok.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A connection to RabbitMQ. Clones share it; it closes when the last is
/// dropped, or when the broker or the network ends it.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
    _close_on_drop: Arc<DropGuard>,
}

struct Inner {
    outbox: Mutex<Outbox>,
    /// Wakes the writer: something was queued.
    queued: Notify,
    /// Wakes senders held back by `OUTBOX_HIGH_WATER`.
    drained: Notify,
    channels: Mutex<Vec<Option<Arc<ChannelShared>>>>,
    /// Why the connection ended; set once, then every call fails with it.
    failure: Mutex<Option<String>>,
    open: AtomicBool,
    /// Set by the reader on every read, cleared by the heart-beat check.
    heard: AtomicBool,
    frame_max: usize,
    /// Ends both tasks: the last handle was dropped, or the connection failed.
    stop: CancellationToken,
}

#[derive(Default)]
struct Outbox {
    bytes: BytesMut,
    /// gen_frame writes into a Vec; kept to reuse its allocation.
    scratch: Vec<u8>,
}

impl Outbox {
    fn frame(&mut self, frame: &AMQPFrame) {
        let scratch = std::mem::take(&mut self.scratch);
        match gen_frame(frame)(WriteContext::from(scratch)) {
            Ok(context) => {
                let (mut scratch, _) = context.into_inner();
                self.bytes.extend_from_slice(&scratch);
                scratch.clear();
                self.scratch = scratch;
            }
            // Only a value too long for its AMQP type fails, and the
            // adapter checks lengths before it gets here.
            Err(e) => tracing::error!(error = %e, "could not encode an AMQP frame"),
        }
    }

    fn method(&mut self, channel: u16, method: AMQPClass) {
        self.frame(&AMQPFrame::Method(channel, method));
    }

    /// A method frame whose arguments `args` writes, for the hot methods.
    fn raw_method(&mut self, channel: u16, method: u16, args: impl FnOnce(&mut BytesMut)) {
        let b = &mut self.bytes;
        b.put_u8(FRAME_METHOD);
        b.put_u16(channel);
        let size_at = b.len();
        b.put_u32(0);
        b.put_u16(CLASS_BASIC);
        b.put_u16(method);
        args(b);
        let size = (b.len() - size_at - 4) as u32;
        b[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
        b.put_u8(FRAME_END);
    }
}

fn put_short_string(b: &mut BytesMut, s: &str) {
    // Callers pass names the adapter checked to fit in 255 bytes.
    let s = &s.as_bytes()[..s.len().min(255)];
    b.put_u8(s.len() as u8);
    b.put_slice(s);
}

/// One channel's state, shared by its session (calls, publishes, takes)
/// and the connection's reader (replies, confirms, deliveries). A std
/// mutex: it is held for a few field updates, never across an await.
struct ChannelShared {
    id: u16,
    state: Mutex<ChannelState>,
}

#[derive(Default)]
struct ChannelState {
    /// Why the channel ended, once it has: every call fails with it.
    closed: Option<BrokerError>,
    /// Synchronous calls waiting for their reply, oldest first.
    replies: VecDeque<oneshot::Sender<Result<AMQPClass, BrokerError>>>,
    /// A deliver or return whose header and body are still coming.
    incoming: Option<Incoming>,
    consumers: Vec<ConsumerQueue>,
    /// The session's task, waiting for a delivery.
    waker: Option<Waker>,
    /// Publishes not yet confirmed, by sequence number.
    confirms: VecDeque<Pending>,
    next_seq: u64,
    /// Sequence numbers of returned publishes whose confirm has not come.
    returned: Vec<u64>,
}

struct Pending {
    seq: u64,
    done: oneshot::Sender<Result<Confirmed, BrokerError>>,
}

struct ConsumerQueue {
    tag: ShortString,
    messages: VecDeque<Message>,
    /// Cancelled (by us or the broker): nothing more will come.
    ended: bool,
}

struct Incoming {
    /// None for a returned publish.
    deliver: Option<basic::Deliver>,
    properties: BasicProperties,
    size: usize,
    body: BytesMut,
    /// The whole body when it came in one frame, without a copy.
    single: Option<Bytes>,
}

/// A message the broker delivered to a consumer.
pub struct Message {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub body: Bytes,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these states half-updated in a way
    // that matters more than losing the connection would.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

impl Connection {
    /// Connects, logs in and opens the virtual host of `url`.
    pub async fn open(url: &str, name: &str) -> Result<Connection, BrokerError> {
        let unavailable = |e: String| BrokerError::Unavailable(e);
        let uri: AMQPUri = url.parse().map_err(unavailable)?;
        let host = uri.authority.host.clone();
        let address = (host.as_str(), uri.authority.port);
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| unavailable(format!("{host}:{}: {e}", uri.authority.port)))?;
        let _ = tcp.set_nodelay(true);
        let mut stream: Box<dyn Stream> = match uri.scheme {
            AMQPScheme::AMQP => Box::new(tcp),
            AMQPScheme::AMQPS => Box::new(tls(tcp, &host).await.map_err(unavailable)?),
        };
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let tuned = handshake(&mut stream, &mut buf, &uri, name)
            .await
            .map_err(unavailable)?;
        let inner = Arc::new(Inner {
            outbox: Mutex::new(Outbox::default()),
            queued: Notify::new(),
            drained: Notify::new(),
            channels: Mutex::new(vec![None; usize::from(tuned.channel_max) + 1]),
            failure: Mutex::new(None),
            open: AtomicBool::new(true),
            heard: AtomicBool::new(true),
            frame_max: tuned.frame_max as usize,
            stop: CancellationToken::new(),
        });
        let (reader, writer) = tokio::io::split(stream);
        let heartbeat = (tuned.heartbeat > 0).then(|| Duration::from_secs(tuned.heartbeat.into()));
        tokio::spawn(read_loop(inner.clone(), reader, buf));
        tokio::spawn(write_loop(inner.clone(), writer, heartbeat));
        Ok(Connection {
            _close_on_drop: Arc::new(inner.stop.clone().drop_guard()),
            inner,
        })
    }

    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Opens a channel on the first free id.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let shared = {
            let mut channels = lock(&self.inner.channels);
            let id = channels
                .iter()
                .skip(1)
                .position(Option::is_none)
                .map(|i| i + 1)
                .ok_or_else(|| BrokerError::Unavailable("no free channel".into()))?;
            let shared = Arc::new(ChannelShared {
                id: id as u16,
                state: Mutex::new(ChannelState {
                    next_seq: 1,
                    ..ChannelState::default()
                }),
            });
            channels[id] = Some(shared.clone());
            shared
        };
        let channel = Channel {
            connection: self.clone(),
            shared,
        };
        channel
            .call(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {},
            )))
            .await?;
        Ok(channel)
    }
}

impl Inner {
    fn failure(&self) -> BrokerError {
        let why = lock(&self.failure).clone();
        BrokerError::Unavailable(why.unwrap_or_else(|| "connection closed".into()))
    }

    /// Queues frames for the writer; fails once the connection has ended.
    fn send(&self, write: impl FnOnce(&mut Outbox)) -> Result<(), BrokerError> {
        if !self.open.load(Ordering::Relaxed) {
            return Err(self.failure());
        }
        let mut outbox = lock(&self.outbox);
        let was_empty = outbox.bytes.is_empty();
        write(&mut outbox);
        drop(outbox);
        if was_empty {
            self.queued.notify_one();
        }
        Ok(())
    }

    /// Waits while the outbox is over its high-water mark.
    async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if lock(&self.outbox).bytes.len() <= OUTBOX_HIGH_WATER
                || !self.open.load(Ordering::Relaxed)
            {
                return;
            }
            drained.await;
        }
    }

    /// Ends the connection: every channel fails with `why`.
    fn fail(&self, why: String) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_some() {
                return;
            }
            *failure = Some(why.clone());
        }
        self.open.store(false, Ordering::Relaxed);
        self.stop.cancel();
        self.drained.notify_waiters();
        let channels: Vec<_> = lock(&self.channels)
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for channel in channels {
            channel.fail(BrokerError::Unavailable(why.clone()));
        }
    }

    fn channel(&self, id: u16) -> Option<Arc<ChannelShared>> {
        lock(&self.channels).get(usize::from(id))?.clone()
    }

    fn free(&self, id: u16) {
        if let Some(slot) = lock(&self.channels).get_mut(usize::from(id)) {
            *slot = None;
        }
    }

    /// What the reader does with one frame; an error ends the connection.
    fn on_frame(&self, frame: Frame) -> Result<(), String> {
        let channel_id = match &frame {
            Frame::Heartbeat => return Ok(()),
            Frame::Method(0, method) => return self.on_connection_method(method),
            Frame::Method(id, _) | Frame::Header(id, _) | Frame::Body(id, _) => *id,
        };
        let Some(channel) = self.channel(channel_id) else {
            // Frames for a channel we already let go of (its close-ok is
            // on the way): nothing waits for them.
            return Ok(());
        };
        if let Frame::Method(_, method) = frame {
            return self.on_channel_method(&channel, method);
        }
        let mut state = lock(&channel.state);
        match frame {
            Frame::Header(_, header) => {
                let incoming = state
                    .incoming
                    .as_mut()
                    .ok_or("a content header without a deliver or return")?;
                incoming.size = header.body_size as usize;
                incoming.properties = header.properties;
                if incoming.size == 0 {
                    state.complete();
                }
            }
            Frame::Body(_, bytes) => {
                let incoming = state
                    .incoming
                    .as_mut()
                    .ok_or("a content body without a deliver or return")?;
                if incoming.single.is_none()
                    && incoming.body.is_empty()
                    && bytes.len() == incoming.size
                {
                    incoming.single = Some(bytes);
                } else {
                    incoming.body.extend_from_slice(&bytes);
                }
                let have = incoming
                    .single
                    .as_ref()
                    .map_or(incoming.body.len(), Bytes::len);
                if have >= incoming.size {
                    state.complete();
                }
            }
            Frame::Method(..) | Frame::Heartbeat => {}
        }
        Ok(())
    }

    fn on_connection_method(&self, method: &AMQPClass) -> Result<(), String> {
        match method {
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                let _ = self.send(|o| {
                    o.method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )
                });
                Err(format!(
                    "the broker closed the connection: {} {}",
                    close.reply_code,
                    close.reply_text.as_str()
                ))
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                Err("connection closed".into())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked)) => {
                tracing::warn!(reason = %blocked.reason.as_str(), "the broker blocks publishing");
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                tracing::info!("the broker unblocked publishing");
                Ok(())
            }
            other => {
                tracing::debug!(method = ?other, "ignored a connection method");
                Ok(())
            }
        }
    }

    fn on_channel_method(&self, channel: &ChannelShared, method: AMQPClass) -> Result<(), String> {
        let mut state = lock(&channel.state);
        match method {
            AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)) => {
                state.incoming = Some(Incoming::new(Some(deliver)));
            }
            AMQPClass::Basic(basic::AMQPMethod::Return(_)) => {
                state.incoming = Some(Incoming::new(None));
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                state.confirm(ack.delivery_tag, ack.multiple, true);
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                state.confirm(nack.delivery_tag, nack.multiple, false);
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                // The broker cancelled a consumer (its queue was deleted).
                state.end_consumer(&cancel.consumer_tag);
                if !cancel.nowait {
                    let id = channel.id;
                    let tag = cancel.consumer_tag;
                    let _ = self.send(|o| {
                        o.method(
                            id,
                            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: tag,
                            })),
                        )
                    });
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)) => {
                // Every delivery to the consumer came before this.
                state.end_consumer(&ok.consumer_tag);
                state.reply(Ok(AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok))));
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(close)) => {
                // A channel error is caused by what was asked on it
                // (NOT_FOUND, ACCESS_REFUSED…): the broker refused.
                let why = format!("{} {}", close.reply_code, close.reply_text.as_str());
                state.fail(BrokerError::Refused(why));
                drop(state);
                let id = channel.id;
                let _ = self.send(|o| {
                    o.method(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                });
                self.free(id);
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok)) => {
                state.reply(Ok(AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok))));
                state.fail(BrokerError::Unavailable("channel closed".into()));
                drop(state);
                self.free(channel.id);
            }
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                let id = channel.id;
                let _ = self.send(|o| {
                    o.method(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                            active: flow.active,
                        })),
                    )
                });
            }
            reply => state.reply(Ok(reply)),
        }
        Ok(())
    }
}

impl ChannelShared {
    fn fail(&self, error: BrokerError) {
        lock(&self.state).fail(error);
    }
}

impl ChannelState {
    fn fail(&mut self, error: BrokerError) {
        if self.closed.is_none() {
            self.closed = Some(error.clone());
        }
        for reply in self.replies.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        for pending in self.confirms.drain(..) {
            let _ = pending.done.send(Err(error.clone()));
        }
        self.incoming = None;
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn reply(&mut self, reply: Result<AMQPClass, BrokerError>) {
        if let Some(waiting) = self.replies.pop_front() {
            let _ = waiting.send(reply);
        }
    }

    fn end_consumer(&mut self, tag: &ShortString) {
        if let Some(consumer) = self.consumers.iter_mut().find(|c| &c.tag == tag) {
            consumer.ended = true;
        }
        self.wake();
    }

    /// The broker confirmed (or refused) publish `seq`, or with `multiple`
    /// every one up to it. Confirms usually come in order, but need not.
    fn confirm(&mut self, seq: u64, multiple: bool, ack: bool) {
        if multiple {
            while self.confirms.front().is_some_and(|p| p.seq <= seq) {
                if let Some(pending) = self.confirms.pop_front() {
                    self.settle(pending, ack);
                }
            }
        } else if let Ok(i) = self.confirms.binary_search_by_key(&seq, |p| p.seq) {
            if let Some(pending) = self.confirms.remove(i) {
                self.settle(pending, ack);
            }
        }
    }

    fn settle(&mut self, pending: Pending, ack: bool) {
        let returned = self.returned.iter().position(|s| *s == pending.seq);
        if let Some(i) = returned {
            self.returned.swap_remove(i);
        }
        let result = match (ack, returned) {
            (true, None) => Ok(Confirmed::Routed),
            (true, Some(_)) => Ok(Confirmed::Unroutable),
            (false, _) => Err(BrokerError::Nacked),
        };
        let _ = pending.done.send(result);
    }

    /// A deliver's or return's body is complete.
    fn complete(&mut self) {
        let Some(incoming) = self.incoming.take() else {
            return;
        };
        let body = incoming.single.unwrap_or_else(|| incoming.body.freeze());
        let Some(deliver) = incoming.deliver else {
            if let Some(seq) = stamp_of(&incoming.properties) {
                self.returned.push(seq);
            }
            return;
        };
        let message = Message {
            delivery_tag: deliver.delivery_tag,
            redelivered: deliver.redelivered,
            exchange: deliver.exchange,
            routing_key: deliver.routing_key,
            properties: incoming.properties,
            body,
        };
        match self
            .consumers
            .iter_mut()
            .find(|c| c.tag == deliver.consumer_tag)
        {
            Some(consumer) => consumer.messages.push_back(message),
            None => {
                tracing::debug!(consumer = %deliver.consumer_tag.as_str(), "a delivery for no consumer")
            }
        }
        self.wake();
    }
}

impl Incoming {
    fn new(deliver: Option<basic::Deliver>) -> Incoming {
        Incoming {
            deliver,
            properties: BasicProperties::default(),
            size: 0,
            body: BytesMut::new(),
            single: None,
        }
    }
}

/// One channel, used by one session.
pub struct Channel {
    connection: Connection,
    shared: Arc<ChannelShared>,
}

impl Channel {
    pub fn is_open(&self) -> bool {
        self.connection.is_open() && lock(&self.shared.state).closed.is_none()
    }

    /// Sends a synchronous method and waits for the broker's reply.
    pub async fn call(&self, method: AMQPClass) -> Result<AMQPClass, BrokerError> {
        self.connection.inner.room().await;
        let reply = self.request(method)?;
        reply.await.map_err(|_| self.connection.inner.failure())?
    }

    /// Sends a synchronous method; the receiver gets the reply.
    fn request(
        &self,
        method: AMQPClass,
    ) -> Result<oneshot::Receiver<Result<AMQPClass, BrokerError>>, BrokerError> {
        let (tx, rx) = oneshot::channel();
        let mut state = lock(&self.shared.state);
        if let Some(closed) = &state.closed {
            return Err(closed.clone());
        }
        self.connection
            .inner
            .send(|o| o.method(self.shared.id, method))?;
        state.replies.push_back(tx);
        Ok(rx)
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
        self.connection.inner.room().await;
        let started = self.request(self.consumer(queue, tag, no_ack))?;
        let cancel = basic::Cancel {
            consumer_tag: old.into(),
            nowait: false,
        };
        let cancelled = self.request(AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)))?;
        for reply in [started, cancelled] {
            reply.await.map_err(|_| self.connection.inner.failure())??;
        }
        Ok(())
    }

    /// A basic.consume for `tag`, whose deliveries are kept from now on.
    fn consumer(&self, queue: &str, tag: &str, no_ack: bool) -> AMQPClass {
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
    /// the receiver gets the broker's confirm: routed, or returned.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        mut headers: FieldTable,
        body: &[u8],
    ) -> Result<oneshot::Receiver<Result<Confirmed, BrokerError>>, BrokerError> {
        let inner = &self.connection.inner;
        inner.room().await;
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

    pub async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        self.basic(80, |b| {
            b.put_u64(tag);
            b.put_u8(u8::from(multiple));
        })
        .await
    }

    pub async fn nack(&self, tag: u64, requeue: bool) -> Result<(), BrokerError> {
        self.basic(120, |b| {
            b.put_u64(tag);
            b.put_u8(u8::from(requeue) << 1);
        })
        .await
    }

    async fn basic(
        &self,
        method: u16,
        args: impl FnOnce(&mut BytesMut),
    ) -> Result<(), BrokerError> {
        let inner = &self.connection.inner;
        inner.room().await;
        let state = lock(&self.shared.state);
        if let Some(closed) = &state.closed {
            return Err(closed.clone());
        }
        inner.send(|o| o.raw_method(self.shared.id, method, args))
    }

    /// Closes the channel and waits for the broker to agree.
    pub async fn close(&self) -> Result<(), BrokerError> {
        let close = channel::Close {
            reply_code: 200,
            reply_text: "session closed".into(),
            class_id: 0,
            method_id: 0,
        };
        self.call(AMQPClass::Channel(channel::AMQPMethod::Close(close)))
            .await
            .map(drop)
    }
}

impl Drop for Channel {
    /// A channel dropped without [`Channel::close`] (its session's task
    /// was aborted) is closed without waiting; its id is free once the
    /// broker's close-ok comes.
    fn drop(&mut self) {
        let state = lock(&self.shared.state);
        if state.closed.is_some() {
            return;
        }
        let id = self.shared.id;
        let _ = self.connection.inner.send(|o| {
            o.method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 200,
                    reply_text: "session ended".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
        });
    }
}

/// The [`STAMP_HEADER`] of a message, as [`Channel::publish`] set it.
fn stamp_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(STAMP_HEADER)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A parsed frame. Bodies are slices of the read buffer, not copies.
enum Frame {
    Method(u16, AMQPClass),
    Header(u16, AMQPContentHeader),
    Body(u16, Bytes),
    Heartbeat,
}

/// The next whole frame in `buf`, if one is there.
fn parse_frame(buf: &mut BytesMut, frame_max: usize) -> Result<Option<Frame>, String> {
    if buf.len() < FRAME_HEAD {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size > frame_max {
        return Err(format!(
            "a frame of {size} bytes, over frame_max {frame_max}"
        ));
    }
    if buf.len() < FRAME_HEAD + size + 1 {
        buf.reserve(FRAME_HEAD + size + 1 - buf.len());
        return Ok(None);
    }
    if buf[FRAME_HEAD + size] != FRAME_END {
        return Err("a frame without its end marker".into());
    }
    buf.advance(FRAME_HEAD);
    let payload = buf.split_to(size);
    buf.advance(1);
    let malformed = |e| format!("a malformed frame: {e:?}");
    Ok(Some(match kind {
        FRAME_METHOD => match wire::deliver(&payload) {
            Some(deliver) => Frame::Method(
                channel,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver?)),
            ),
            None => {
                let (_, method) =
                    amq_protocol::protocol::parse_class(&payload[..]).map_err(malformed)?;
                Frame::Method(channel, method)
            }
        },
        FRAME_HEADER => Frame::Header(channel, wire::content_header(&payload)?),
        FRAME_BODY => Frame::Body(channel, payload.freeze()),
        FRAME_HEARTBEAT => Frame::Heartbeat,
        other => return Err(format!("a frame of unknown type {other}")),
    }))
}

async fn read_frame(stream: &mut Box<dyn Stream>, buf: &mut BytesMut) -> Result<Frame, String> {
    loop {
        if let Some(frame) = parse_frame(buf, FRAME_MAX as usize)? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the broker closed the connection during the handshake".into());
        }
    }
}

/// A method the handshake expects; a Connection.Close is the broker's
/// refusal (wrong password, unknown vhost) and says why.
async fn read_method(
    stream: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
) -> Result<connection::AMQPMethod, String> {
    loop {
        match read_frame(stream, buf).await? {
            Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                return Err(format!(
                    "the broker refused the connection: {} {}",
                    close.reply_code,
                    close.reply_text.as_str()
                ))
            }
            Frame::Method(0, AMQPClass::Connection(method)) => return Ok(method),
            Frame::Heartbeat => {}
            _ => return Err("an unexpected frame during the handshake".into()),
        }
    }
}

async fn write_method(
    stream: &mut Box<dyn Stream>,
    method: connection::AMQPMethod,
) -> Result<(), String> {
    let mut outbox = Outbox::default();
    outbox.method(0, AMQPClass::Connection(method));
    stream
        .write_all(&outbox.bytes)
        .await
        .map_err(|e| e.to_string())
}

struct Tuned {
    channel_max: u16,
    frame_max: u32,
    heartbeat: u16,
}

async fn handshake(
    stream: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
    uri: &AMQPUri,
    name: &str,
) -> Result<Tuned, String> {
    stream
        .write_all(PROTOCOL_HEADER)
        .await
        .map_err(|e| e.to_string())?;
    let connection::AMQPMethod::Start(_) = read_method(stream, buf).await? else {
        return Err("the broker did not start the handshake".into());
    };
    let mut capabilities = FieldTable::default();
    for capability in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        // Without it RabbitMQ drops a failed login without saying why.
        "authentication_failure_close",
    ] {
        capabilities.insert(capability.into(), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    properties.insert("product".into(), AMQPValue::LongString("stompgate".into()));
    properties.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    properties.insert("connection_name".into(), AMQPValue::LongString(name.into()));
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let user = &uri.authority.userinfo;
    let response = format!("\0{}\0{}", user.username, user.password);
    write_method(
        stream,
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: properties,
            mechanism: "PLAIN".into(),
            response: LongString::from(response.as_bytes()),
            locale: "en_US".into(),
        }),
    )
    .await?;
    let connection::AMQPMethod::Tune(tune) = read_method(stream, buf).await? else {
        return Err("the broker did not tune the connection".into());
    };
    let pick = |server: u32, ours: Option<u32>, most: u32| {
        let server = if server == 0 { most } else { server.min(most) };
        ours.map_or(server, |o| o.min(server))
    };
    let tuned = Tuned {
        channel_max: pick(
            tune.channel_max.into(),
            uri.query.channel_max.map(u32::from),
            CHANNEL_MAX.into(),
        ) as u16,
        frame_max: pick(tune.frame_max, uri.query.frame_max, FRAME_MAX),
        heartbeat: uri.query.heartbeat.unwrap_or(tune.heartbeat),
    };
    write_method(
        stream,
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tuned.channel_max,
            frame_max: tuned.frame_max,
            heartbeat: tuned.heartbeat,
        }),
    )
    .await?;
    write_method(
        stream,
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: uri.vhost.as_str().into(),
        }),
    )
    .await?;
    let connection::AMQPMethod::OpenOk(_) = read_method(stream, buf).await? else {
        return Err("the broker did not open the virtual host".into());
    };
    Ok(tuned)
}

async fn tls(
    tcp: TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS to {host}: {e}"))
}

/// Reads frames and hands them out until the connection ends, then fails
/// every channel with the reason.
async fn read_loop(inner: Arc<Inner>, mut reader: impl AsyncRead + Unpin, mut buf: BytesMut) {
    let why = 'read: loop {
        loop {
            match parse_frame(&mut buf, inner.frame_max) {
                Ok(Some(frame)) => {
                    if let Err(why) = inner.on_frame(frame) {
                        break 'read why;
                    }
                }
                Ok(None) => break,
                Err(why) => break 'read why,
            }
        }
        buf.reserve(16 * 1024);
        let read = tokio::select! {
            read = reader.read_buf(&mut buf) => read,
            () = inner.stop.cancelled() => {
                // Dropped by the gateway: the writer says goodbye; the
                // broker's close-ok (or silence) ends the wait.
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    loop {
                        match reader.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => buf.clear(),
                        }
                    }
                })
                .await;
                break 'read "connection closed".to_owned();
            }
        };
        match read {
            Ok(0) => break "the broker closed the connection".to_owned(),
            Ok(_) => inner.heard.store(true, Ordering::Relaxed),
            Err(e) => break format!("reading from the broker: {e}"),
        }
    };
    tracing::debug!(%why, "AMQP connection ended");
    inner.fail(why);
}

/// Writes what sessions queued, in batches, and heart-beats when idle;
/// ends the connection when the broker has been silent for two intervals.
async fn write_loop(
    inner: Arc<Inner>,
    mut writer: impl AsyncWrite + Unpin,
    heartbeat: Option<Duration>,
) {
    let interval = heartbeat.map_or(Duration::from_secs(3600), |h| h / 2);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut spare = BytesMut::new();
    let mut wrote = false;
    let mut silent_ticks = 0;
    loop {
        tokio::select! {
            () = inner.queued.notified() => {}
            _ = ticks.tick(), if heartbeat.is_some() => {
                if inner.heard.swap(false, Ordering::Relaxed) {
                    silent_ticks = 0;
                } else {
                    silent_ticks += 1;
                    if silent_ticks >= 4 {
                        inner.fail("the broker missed its heart-beats".into());
                        return;
                    }
                }
                if !std::mem::take(&mut wrote) {
                    spare.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
                }
            }
            () = inner.stop.cancelled() => {
                let mut goodbye = Outbox::default();
                goodbye.method(0, AMQPClass::Connection(connection::AMQPMethod::Close(
                    connection::Close {
                        reply_code: 200,
                        reply_text: "stompgate closing".into(),
                        class_id: 0,
                        method_id: 0,
                    },
                )));
                let _ = writer.write_all(&goodbye.bytes).await;
                let _ = writer.flush().await;
                return;
            }
        }
        {
            let mut outbox = lock(&inner.outbox);
            if spare.is_empty() {
                std::mem::swap(&mut outbox.bytes, &mut spare);
            } else {
                spare.extend_from_slice(&outbox.bytes);
                outbox.bytes.clear();
            }
        }
        inner.drained.notify_waiters();
        if spare.is_empty() {
            continue;
        }
        wrote = true;
        let written = async {
            writer.write_all(&spare).await?;
            writer.flush().await
        };
        if let Err(e) = written.await {
            inner.fail(format!("writing to the broker: {e}"));
            return;
        }
        spare.clear();
    }
}
