//! The gateway's AMQP 0-9-1 client: one connection as two tasks on the
//! gateway's own tokio runtime, and the channels sessions open on it.
//!
//! Why not lapin, which this replaced: lapin drives every connection from an
//! OS thread of its own, so each delivery and each publish crossed from that
//! thread to a session's task and back. At partial load both sleep between
//! messages, and a profile of the gateway at 500 msg/s spent a fifth of its
//! samples switching between them. Here a connection is two tasks on the
//! session runtime: a reader that parses frames and hands each channel its
//! deliveries, confirms and replies, and a writer that flushes what the
//! sessions queued. A message goes from the broker's socket to the client's
//! on the runtime's own threads.
//!
//! What it implements: PLAIN login over TCP or TLS (a private CA and a
//! client certificate through [`Options::tls`]); heart-beats, with the peer
//! declared dead when nothing was read for two intervals, whatever the
//! writer is doing, plus TCP keepalive and `TCP_USER_TIMEOUT`;
//! `connection.blocked` as a state the owner can see; channels whose ids are
//! handed out round-robin and reused only after their close is agreed, whose
//! synchronous replies are checked against what was asked, and which are
//! never closed before their open went out; `channel.flow`; publisher
//! confirms with `mandatory` returns matched to their publish; consumers.
//! A malformed or non-UTF-8 string in a delivery is dropped, not fatal; a
//! malformed method ends its channel, not the connection.
//!
//! What it leaves out: other SASL mechanisms, transactions (`tx.*`),
//! `basic.get`, `nowait` methods, and any method the gateway does not send.
//! amq-protocol (lapin's own codec) parses and encodes the methods and
//! properties; the hot frames (publish, ack, nack, bodies, deliveries and
//! their headers) are handled by hand.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::wire;
use crate::broker::{BrokerError, Confirmed};
use crate::budget::{Budget, Held};

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

/// How long a synchronous method waits for its reply when [`Options`]
/// does not say.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Without heart-beats (`?heartbeat=0`), how long the kernel may hold
/// unacknowledged writes before it gives the connection up.
const USER_TIMEOUT_WITHOUT_HEARTBEAT: Duration = Duration::from_secs(30);

/// What the client reports to whoever opened the connection; the adapter
/// turns it into logs, metrics and readiness. Called from the reader
/// task, so it must not block.
pub trait Observer: Send + Sync + 'static {
    /// The broker blocked publishing on the connection (`Some(reason)`,
    /// e.g. a memory alarm), or lifted the block (`None`).
    fn blocked(&self, reason: Option<&str>);
    /// A delivery or return carried `dropped` strings that were not
    /// UTF-8 (header names, properties): they were left out of it.
    fn lenient(&self, dropped: u32);
    /// The connection ended: `by_gateway` when its last handle was
    /// dropped, else the broker or the network ended it, as `why` says.
    fn ended(&self, why: &str, by_gateway: bool);
}

/// An observer that reports nothing.
struct Quiet;

impl Observer for Quiet {
    fn blocked(&self, _: Option<&str>) {}
    fn lenient(&self, _: u32) {}
    fn ended(&self, _: &str, _: bool) {}
}

/// What opening a connection needs beyond its URL.
#[derive(Clone)]
pub struct Options {
    /// The connection's name in RabbitMQ's management UI.
    pub name: String,
    /// Heart-beat to ask for, in seconds, when the URL has no
    /// `?heartbeat=N`; 0 turns them off. The broker is declared dead after
    /// two silent intervals.
    pub heartbeat: u16,
    /// Longest wait for the reply to a synchronous method; past it the
    /// channel is given up.
    pub call_timeout: Duration,
    /// TLS for `amqps://`; None verifies against the system's CAs.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub observer: Arc<dyn Observer>,
    /// Bounds on the bytes of deliveries held in the gateway; None: none.
    pub holding: Option<Holding>,
}

/// A session that has not come for deliveries for this long, holding
/// more than [`Holding::per_channel`], is not keeping up: a session that
/// is, even in a burst, comes back at once.
const STALLED: Duration = Duration::from_millis(250);
/// The same for a session holding more than [`Holding::floor`] while the
/// node is over its budget: longer, as a node short of memory may be
/// short of CPU too, and a session only slow to be scheduled is not
/// stuck.
const NODE_STALLED: Duration = Duration::from_secs(1);
/// The config key of [`Holding::node`].
const NODE_LIMIT: &str = "amqp.node_prefetch_bytes";

/// How many bytes of deliveries the gateway may hold, counted from their
/// content header until the last copy of their body is dropped (the
/// session has written them to its client). RabbitMQ's prefetch counts
/// messages only, and a consumer without acks has none: this is the bound
/// in bytes. A delivery that would take a channel whose session has not
/// come for deliveries for `STALLED` past `per_channel` (or any channel
/// past twice that), unless the channel holds nothing (one message of
/// any size may pass), or one past `floor` while the node is over its
/// `node` budget and the session has not come for `NODE_STALLED`, overruns
/// the channel: its deliveries are dropped, the broker is told to close
/// it, and its calls and takes fail with [`BrokerError::Overrun`].
#[derive(Clone)]
pub struct Holding {
    pub per_channel: usize,
    pub floor: usize,
    pub node: Arc<Budget>,
}

impl Options {
    /// Defaults: a 10 s heart-beat and call timeout, the system's CAs, no
    /// reports.
    pub fn new(name: &str) -> Options {
        Options {
            name: name.to_owned(),
            heartbeat: 10,
            call_timeout: CALL_TIMEOUT,
            tls: None,
            observer: Arc::new(Quiet),
            holding: None,
        }
    }
}

/// A connection to RabbitMQ. Clones share it; it closes when the last is
/// dropped, or when the broker or the network ends it.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
    _close_on_drop: Arc<DropGuard>,
}

struct Inner {
    outbox: Mutex<Outbox>,
    /// The outbox's length, readable without its lock: sessions check it
    /// on every turn of their loop (see [`Channel::writable`]).
    queued_bytes: AtomicUsize,
    /// Wakes the writer: something was queued.
    queued: Notify,
    /// Wakes those waiting for room: the writer took the outbox, a
    /// channel's flow resumed, or the connection ended.
    drained: Notify,
    channels: Mutex<Channels>,
    /// Why the connection ended; set once, then every call fails with it.
    failure: Mutex<Option<String>>,
    open: AtomicBool,
    /// The broker's reason while it blocks publishing (`connection.blocked`).
    blocked: Mutex<Option<String>>,
    frame_max: usize,
    call_timeout: Duration,
    observer: Arc<dyn Observer>,
    holding: Option<Holding>,
    /// Ends both tasks: the last handle was dropped, or the connection failed.
    stop: CancellationToken,
}

/// Channel ids and who holds them. An id stays taken from its open until
/// the broker agreed to its close, so a late reply for an old channel can
/// never reach a new one with the same number.
struct Channels {
    slots: Vec<Option<Arc<ChannelShared>>>,
    /// Where the search for a free id starts: ids go round, as in lapin,
    /// rather than the lowest free one at once.
    next: usize,
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

fn close_method(reply_text: &str) -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
        reply_code: 200,
        reply_text: reply_text.into(),
        class_id: 0,
        method_id: 0,
    }))
}

/// One channel's state, shared by its session (calls, publishes, takes)
/// and the connection's reader (replies, confirms, deliveries). A std
/// mutex: it is held for a few field updates, never across an await.
struct ChannelShared {
    id: u16,
    state: Mutex<ChannelState>,
    /// Set by `channel.flow` with active false: the broker asks for no
    /// more publishes until it clears it. Outside the state's lock, as
    /// sessions read it on every turn of their loop.
    paused: AtomicBool,
    /// Bytes of this channel's deliveries held in the gateway (see
    /// [`Holding`]).
    held: Arc<AtomicUsize>,
    /// Cancelled when the node's budget cut the channel off (see
    /// [`Channel::cut_off`]).
    cut: CancellationToken,
}

/// Where a channel is in its life, as the broker sees it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its `channel.open` has not gone into the outbox yet: the broker
    /// knows nothing of it, so it is never sent a close.
    #[default]
    Unopened,
    /// Opened (or its open is queued): methods may follow.
    Open,
    /// We sent `channel.close`: everything but the broker's close or
    /// close-ok is ignored until the close-ok frees the id.
    Closing,
    /// Over; the id is free (or freed with the connection).
    Closed,
}

#[derive(Default)]
struct ChannelState {
    phase: Phase,
    /// Why the channel ended, once it has: every call fails with it.
    closed: Option<BrokerError>,
    /// Synchronous calls waiting for their reply, oldest first.
    replies: VecDeque<Waiting>,
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
    /// When the session last came for deliveries (see [`STALLED`]).
    last_take: Option<Instant>,
}

/// A synchronous call and the reply it expects: class and method id.
struct Waiting {
    expects: (u16, u16),
    done: oneshot::Sender<Result<AMQPClass, BrokerError>>,
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
    /// The body's bytes, charged from the content header on.
    held: Option<Held>,
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

/// A URL's user, host and virtual host, without its password: for logs.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(an unparsable URL)".into(),
    }
}

impl Connection {
    /// Connects, logs in and opens the virtual host of `url`. Not bounded
    /// in time by itself: callers put their `amqp.connect_timeout` on it.
    pub async fn open(url: &str, options: &Options) -> Result<Connection, BrokerError> {
        let unavailable = |e: String| BrokerError::Unavailable(e);
        let uri: AMQPUri = url.parse().map_err(unavailable)?;
        let host = uri.authority.host.clone();
        let address = (host.as_str(), uri.authority.port);
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| unavailable(format!("{host}:{}: {e}", uri.authority.port)))?;
        let heartbeat = uri.query.heartbeat.unwrap_or(options.heartbeat);
        guard_socket(&tcp, heartbeat);
        let mut stream: Box<dyn Stream> = match uri.scheme {
            AMQPScheme::AMQP => Box::new(tcp),
            AMQPScheme::AMQPS => Box::new(
                tls(tcp, &host, options.tls.clone())
                    .await
                    .map_err(unavailable)?,
            ),
        };
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let port = uri.authority.port;
        let tuned = handshake(&mut stream, &mut buf, &uri, options, heartbeat)
            .await
            .map_err(|e| unavailable(format!("{host}:{port}: {e}")))?;
        let inner = Arc::new(Inner {
            outbox: Mutex::new(Outbox::default()),
            queued_bytes: AtomicUsize::new(0),
            queued: Notify::new(),
            drained: Notify::new(),
            channels: Mutex::new(Channels {
                slots: vec![None; usize::from(tuned.channel_max) + 1],
                next: 1,
            }),
            failure: Mutex::new(None),
            open: AtomicBool::new(true),
            blocked: Mutex::new(None),
            frame_max: tuned.frame_max as usize,
            call_timeout: options.call_timeout,
            observer: options.observer.clone(),
            holding: options.holding.clone(),
            stop: CancellationToken::new(),
        });
        let (reader, writer) = tokio::io::split(stream);
        let heartbeat = (tuned.heartbeat > 0).then(|| Duration::from_secs(tuned.heartbeat.into()));
        tokio::spawn(read_loop(inner.clone(), reader, buf, heartbeat));
        tokio::spawn(write_loop(inner.clone(), writer, heartbeat));
        if inner.holding.is_some() {
            tokio::spawn(sweep_loop(Arc::downgrade(&inner)));
        }
        Ok(Connection {
            _close_on_drop: Arc::new(inner.stop.clone().drop_guard()),
            inner,
        })
    }

    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// The broker's reason while it blocks publishing on this connection.
    pub fn blocked(&self) -> Option<String> {
        lock(&self.inner.blocked).clone()
    }

    /// How many channels the broker allows on this connection.
    pub fn channel_max(&self) -> usize {
        lock(&self.inner.channels).slots.len() - 1
    }

    /// Resolves once the connection has ended, with the reason.
    pub async fn closed(&self) -> String {
        self.inner.stop.cancelled().await;
        lock(&self.inner.failure)
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }

    /// Opens a channel on the next free id.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let shared = {
            let mut channels = lock(&self.inner.channels);
            let size = channels.slots.len();
            let start = channels.next;
            let id = (0..size - 1)
                .map(|i| 1 + (start - 1 + i) % (size - 1))
                .find(|&id| channels.slots[id].is_none())
                .ok_or_else(|| BrokerError::Unavailable("no free channel".into()))?;
            let shared = Arc::new(ChannelShared {
                id: id as u16,
                state: Mutex::new(ChannelState {
                    next_seq: 1,
                    last_take: Some(Instant::now()),
                    ..ChannelState::default()
                }),
                paused: AtomicBool::new(false),
                held: Arc::new(AtomicUsize::new(0)),
                cut: CancellationToken::new(),
            });
            channels.slots[id] = Some(shared.clone());
            channels.next = id % (size - 1) + 1;
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

/// Keepalive and `TCP_USER_TIMEOUT` on the broker socket: a write the
/// kernel cannot deliver, or a peer gone without a word, ends the socket
/// even when no heart-beat is due.
fn guard_socket(tcp: &TcpStream, heartbeat: u16) {
    let _ = tcp.set_nodelay(true);
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive on the broker socket");
    }
    let user_timeout = match heartbeat {
        0 => USER_TIMEOUT_WITHOUT_HEARTBEAT,
        h => Duration::from_secs(u64::from(h) * 2),
    };
    if let Err(e) = socket.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT on the broker socket");
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
        self.queued_bytes
            .store(outbox.bytes.len(), Ordering::Relaxed);
        drop(outbox);
        if was_empty {
            self.queued.notify_one();
        }
        Ok(())
    }

    /// Whether the outbox is under its high-water mark (or the connection
    /// is over, so that callers go on and meet the error).
    fn has_room(&self) -> bool {
        self.queued_bytes.load(Ordering::Relaxed) <= OUTBOX_HIGH_WATER
            || !self.open.load(Ordering::Relaxed)
    }

    /// Ends the connection: every channel fails with `why`.
    fn fail(&self, why: String) {
        self.end(why, false);
    }

    /// Ends the connection, once: every channel fails with `why`, and the
    /// observer hears of it (`by_gateway` when its last handle was
    /// dropped, rather than the broker or the network ending it).
    fn end(&self, why: String, by_gateway: bool) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_some() {
                return;
            }
            *failure = Some(why.clone());
        }
        self.observer.ended(&why, by_gateway);
        self.open.store(false, Ordering::Relaxed);
        self.stop.cancel();
        self.drained.notify_waiters();
        let channels: Vec<_> = lock(&self.channels)
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for channel in channels {
            let mut state = lock(&channel.state);
            state.fail(BrokerError::Unavailable(why.clone()));
            state.phase = Phase::Closed;
        }
    }

    fn channel(&self, id: u16) -> Option<Arc<ChannelShared>> {
        lock(&self.channels).slots.get(usize::from(id))?.clone()
    }

    /// Lets id go; callers hold no channel state lock.
    fn free(&self, id: u16) {
        if let Some(slot) = lock(&self.channels).slots.get_mut(usize::from(id)) {
            *slot = None;
        }
    }

    /// Gives a channel up after a protocol fault on it (a reply nobody
    /// asked for, a malformed method, a call that timed out): its calls
    /// fail as if the broker were lost, so the session opens a new one,
    /// and the broker is told to close it.
    fn abandon(&self, channel: &ChannelShared, why: String) {
        self.give_up(channel, BrokerError::Unavailable(why));
    }

    /// A delivery would take the channel past what it may hold: what it
    /// holds is dropped, and the channel given up with `error`.
    fn overrun(&self, channel: &ChannelShared, error: BrokerError) {
        let dropped: Vec<VecDeque<Message>> = lock(&channel.state)
            .consumers
            .iter_mut()
            .map(|c| std::mem::take(&mut c.messages))
            .collect();
        drop(dropped);
        self.give_up(channel, error);
    }

    fn give_up(&self, channel: &ChannelShared, error: BrokerError) {
        let mut state = lock(&channel.state);
        state.fail(error);
        match state.phase {
            Phase::Open => {
                state.phase = Phase::Closing;
                let id = channel.id;
                let _ = self.send(|o| o.method(id, close_method("gateway gave the channel up")));
            }
            Phase::Unopened => {
                state.phase = Phase::Closed;
                drop(state);
                self.free(channel.id);
            }
            Phase::Closing | Phase::Closed => {}
        }
    }

    /// What the reader does with one frame; an error ends the connection.
    fn on_frame(&self, frame: Frame) -> Result<(), String> {
        let channel_id = match &frame {
            Frame::Heartbeat => return Ok(()),
            Frame::Method(0, method) => return self.on_connection_method(method),
            Frame::Malformed(0, why) => return Err(why.clone()),
            Frame::Method(id, _)
            | Frame::Header(id, _)
            | Frame::Body(id, _)
            | Frame::Malformed(id, _) => *id,
        };
        let Some(channel) = self.channel(channel_id) else {
            // Frames for a channel we no longer hold: nothing waits for them.
            return Ok(());
        };
        let closing = lock(&channel.state).phase == Phase::Closing;
        let frame = match frame {
            Frame::Method(_, method) => return self.on_channel_method(&channel, method),
            // Whatever came for a closing channel is void.
            _ if closing => return Ok(()),
            Frame::Malformed(_, why) => {
                self.abandon(&channel, format!("the broker sent {why}"));
                return Ok(());
            }
            frame => frame,
        };
        let mut state = lock(&channel.state);
        let mut fault = None;
        // How long the session has not come for deliveries: read for a
        // content header only, not for every body frame.
        let idle = match &frame {
            Frame::Header(..) => state.last_take.map_or(Duration::MAX, |t| t.elapsed()),
            _ => Duration::ZERO,
        };
        match frame {
            Frame::Header(_, header) => match state.incoming.as_mut() {
                Some(incoming) => {
                    incoming.size = usize::try_from(header.body_size).unwrap_or(usize::MAX);
                    incoming.properties = header.properties;
                    if let (Some(holding), Some(_)) = (&self.holding, &incoming.deliver) {
                        match holding.admit(&channel, incoming.size, idle) {
                            Ok(held) => incoming.held = Some(held),
                            Err(overrun) => {
                                drop(state);
                                let node = matches!(
                                    overrun,
                                    BrokerError::Overrun { limit, .. } if limit == NODE_LIMIT
                                );
                                self.overrun(&channel, overrun);
                                if node {
                                    channel.cut.cancel();
                                }
                                return Ok(());
                            }
                        }
                    }
                    if incoming.size == 0 {
                        state.complete();
                    }
                }
                None => fault = Some("a content header without a deliver or return"),
            },
            Frame::Body(_, bytes) => match state.incoming.as_mut() {
                Some(incoming) => {
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
                None => fault = Some("a content body without a deliver or return"),
            },
            Frame::Method(..) | Frame::Malformed(..) | Frame::Heartbeat => {}
        }
        drop(state);
        if let Some(why) = fault {
            self.abandon(&channel, format!("the broker sent {why}"));
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
                let reason = blocked.reason.to_string();
                self.observer.blocked(Some(&reason));
                *lock(&self.blocked) = Some(reason);
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                *lock(&self.blocked) = None;
                self.observer.blocked(None);
                Ok(())
            }
            other => {
                tracing::debug!(method = ?other, "ignored a connection method");
                Ok(())
            }
        }
    }

    fn on_channel_method(&self, channel: &ChannelShared, method: AMQPClass) -> Result<(), String> {
        let id = channel.id;
        let mut state = lock(&channel.state);
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Close(close)) => {
                // A channel error is caused by what was asked on it
                // (NOT_FOUND, ACCESS_REFUSED…): the broker refused.
                let why = format!("{} {}", close.reply_code, close.reply_text.as_str());
                state.fail(BrokerError::Refused(why));
                let _ = self.send(|o| {
                    o.method(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                });
                // Crossed closes: ours is answered too, and the id is free
                // only once that answer came.
                if state.phase != Phase::Closing {
                    state.phase = Phase::Closed;
                    drop(state);
                    self.free(id);
                }
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok)) => {
                if state.phase != Phase::Closing {
                    drop(state);
                    self.abandon(channel, "the broker sent a close-ok for no close".into());
                    return Ok(());
                }
                if state.replies.front().is_some_and(|w| w.expects == (20, 41)) {
                    state.reply(AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok)));
                }
                state.fail(BrokerError::Unavailable("channel closed".into()));
                state.phase = Phase::Closed;
                drop(state);
                self.free(id);
                return Ok(());
            }
            // Until its close-ok, a closing channel hears nothing else.
            _ if state.phase == Phase::Closing => return Ok(()),
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
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                channel.paused.store(!flow.active, Ordering::Relaxed);
                drop(state);
                let _ = self.send(|o| {
                    o.method(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                            active: flow.active,
                        })),
                    )
                });
                if flow.active {
                    self.drained.notify_waiters();
                }
                return Ok(());
            }
            reply => {
                let got = (reply.get_amqp_class_id(), reply.get_amqp_method_id());
                if state.replies.front().is_none_or(|w| w.expects != got) {
                    drop(state);
                    let why = format!("the broker sent a reply nobody asked for: {reply:?}");
                    self.abandon(channel, why);
                    return Ok(());
                }
                if let AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)) = &reply {
                    // Every delivery to the consumer came before this.
                    state.end_consumer(&ok.consumer_tag);
                }
                state.reply(reply);
            }
        }
        Ok(())
    }
}

impl ChannelState {
    fn fail(&mut self, error: BrokerError) {
        if self.closed.is_none() {
            self.closed = Some(error.clone());
        }
        for reply in self.replies.drain(..) {
            let _ = reply.done.send(Err(error.clone()));
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

    fn reply(&mut self, reply: AMQPClass) {
        if let Some(waiting) = self.replies.pop_front() {
            let _ = waiting.done.send(Ok(reply));
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
            (true, None) => Confirmed::Routed,
            (true, Some(_)) => Confirmed::Unroutable,
            (false, _) => Confirmed::Nacked,
        };
        let _ = pending.done.send(Ok(result));
    }

    /// A deliver's or return's body is complete.
    fn complete(&mut self) {
        let Some(incoming) = self.incoming.take() else {
            return;
        };
        let mut body = incoming.single.unwrap_or_else(|| incoming.body.freeze());
        if let Some(held) = incoming.held {
            // Released when the last copy of the body goes.
            body = Bytes::from_owner(HeldBody { body, _held: held });
        }
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
            held: None,
        }
    }
}

impl Holding {
    /// Charges a delivery of `size` bytes to `channel`, or says why it
    /// overruns the channel.
    fn admit(
        &self,
        channel: &ChannelShared,
        size: usize,
        idle: Duration,
    ) -> Result<Held, BrokerError> {
        let held = channel.held.load(Ordering::Relaxed);
        let after = held.saturating_add(size);
        // A session that keeps coming for deliveries is writing them to a
        // client that reads: what it holds passes (a burst without acks,
        // republished SENDs after an outage), up to twice the bound.
        let past = after > self.per_channel && (idle > STALLED || after > self.per_channel * 2);
        if held > 0 && past {
            return Err(BrokerError::Overrun {
                limit: "amqp.prefetch_bytes",
                detail: format!(
                    "the session holds {held} bytes of deliveries its client has not read, \
                     and the next ({size} bytes) would take it past amqp.prefetch_bytes ({})",
                    self.per_channel
                ),
            });
        }
        if held > self.floor && self.node.over() && idle > NODE_STALLED {
            return Err(self.node_overrun(held));
        }
        Ok(self.node.charge(size, Some(channel.held.clone())))
    }

    fn node_overrun(&self, held: usize) -> BrokerError {
        BrokerError::Overrun {
            limit: NODE_LIMIT,
            detail: format!(
                "the node holds more than amqp.node_prefetch_bytes ({}) of deliveries, \
                 and this session {held} bytes its client has not read for {NODE_STALLED:?}",
                self.node.limit()
            ),
        }
    }
}

/// A delivery's body with its charge, released with the body.
struct HeldBody {
    body: Bytes,
    _held: Held,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// One channel, used by one session.
pub struct Channel {
    connection: Connection,
    shared: Arc<ChannelShared>,
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
    fn request(
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

    fn basic(&self, method: u16, args: impl FnOnce(&mut BytesMut)) -> Result<(), BrokerError> {
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
fn writable(connection: &Connection, channel: &ChannelShared) -> bool {
    !connection.is_open()
        || (!channel.paused.load(Ordering::Relaxed) && connection.inner.has_room())
}

/// A method's AMQP name, for messages.
fn method_name(method: &AMQPClass) -> String {
    let debug = format!("{method:?}");
    // `Queue(Bind(Bind { … }))` → `queue.bind`
    let mut parts = debug.split('(').take(2).map(str::to_ascii_lowercase);
    match (parts.next(), parts.next()) {
        (Some(class), Some(method)) => format!("{class}.{method}"),
        _ => debug,
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
    /// A method or header whose payload could not be read: on a channel,
    /// that channel is given up; on channel 0, the connection.
    Malformed(u16, String),
}

/// The next whole frame in `buf`, if one is there; `dropped` counts the
/// strings left out of it for not being UTF-8. An error is a fault in the
/// framing itself, after which nothing more can be read.
fn parse_frame(
    buf: &mut BytesMut,
    frame_max: usize,
    dropped: &mut u32,
) -> Result<Option<Frame>, String> {
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
    let method = |dropped: &mut u32| -> Result<AMQPClass, String> {
        if let Some(deliver) = wire::deliver(&payload, dropped) {
            return Ok(AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver?)));
        }
        if let Some(returned) = wire::returned(&payload, dropped) {
            return Ok(AMQPClass::Basic(basic::AMQPMethod::Return(returned?)));
        }
        amq_protocol::protocol::parse_class(&payload[..])
            .map(|(_, method)| method)
            .map_err(|e| format!("a malformed method: {e:?}"))
    };
    Ok(Some(match kind {
        FRAME_METHOD => match method(dropped) {
            Ok(method) => Frame::Method(channel, method),
            Err(why) => Frame::Malformed(channel, why),
        },
        FRAME_HEADER => match wire::content_header(&payload, dropped) {
            Ok(header) => Frame::Header(channel, header),
            Err(why) => Frame::Malformed(channel, format!("a malformed content header: {why}")),
        },
        FRAME_BODY => Frame::Body(channel, payload.freeze()),
        FRAME_HEARTBEAT => Frame::Heartbeat,
        other => return Err(format!("a frame of unknown type {other}")),
    }))
}

async fn read_frame(stream: &mut Box<dyn Stream>, buf: &mut BytesMut) -> Result<Frame, String> {
    loop {
        if let Some(frame) = parse_frame(buf, FRAME_MAX as usize, &mut 0)? {
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
            Frame::Malformed(_, why) => return Err(format!("during the handshake: {why}")),
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
    options: &Options,
    heartbeat: u16,
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
    properties.insert(
        "connection_name".into(),
        AMQPValue::LongString(options.name.as_str().into()),
    );
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
        // Ours, not the broker's 60 s: a dead broker must be noticed
        // before a SEND's amqp.publish_timeout runs out.
        heartbeat,
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
    config: Option<Arc<rustls::ClientConfig>>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = match config {
        Some(config) => config,
        None => system_tls()?,
    };
    let server = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS to {host}: {e}"))
}

/// TLS that trusts the system's CA certificates, without a client
/// certificate.
fn system_tls() -> Result<Arc<rustls::ClientConfig>, String> {
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
    Ok(Arc::new(config))
}

/// Reads frames and hands them out until the connection ends, then fails
/// every channel with the reason. The broker is declared dead when
/// nothing at all came for two heart-beat intervals, whatever the writer
/// is doing: a write stuck on a frozen broker cannot hide it.
async fn read_loop(
    inner: Arc<Inner>,
    mut reader: impl AsyncRead + Unpin,
    mut buf: BytesMut,
    heartbeat: Option<Duration>,
) {
    let silence = heartbeat.map(|h| h * 2);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut deadline = silence.map_or(far, |s| tokio::time::Instant::now() + s);
    let mut by_gateway = false;
    let why = 'read: loop {
        loop {
            let mut dropped = 0;
            let parsed = parse_frame(&mut buf, inner.frame_max, &mut dropped);
            if dropped > 0 {
                inner.observer.lenient(dropped);
            }
            match parsed {
                Ok(Some(frame)) => {
                    if let Err(why) = inner.on_frame(frame) {
                        break 'read why;
                    }
                }
                Ok(None) => break,
                Err(why) => break 'read format!("the broker sent {why}"),
            }
        }
        buf.reserve(16 * 1024);
        // Each branch is cancel-safe: read_buf keeps what it read.
        let read = tokio::select! {
            read = reader.read_buf(&mut buf) => read,
            () = tokio::time::sleep_until(deadline), if silence.is_some() => {
                break format!(
                    "nothing from the broker for {:?}, two heart-beat intervals",
                    silence.unwrap_or_default()
                );
            }
            () = inner.stop.cancelled() => {
                if lock(&inner.failure).is_some() {
                    break "connection failed".to_owned();
                }
                // Dropped by the gateway: the writer says goodbye; the
                // broker's close-ok (or silence) ends the wait.
                by_gateway = true;
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    loop {
                        match reader.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => buf.clear(),
                        }
                    }
                })
                .await;
                break 'read "connection closed by the gateway".to_owned();
            }
        };
        match read {
            Ok(0) => break "the broker closed the connection".to_owned(),
            Ok(_) => {
                if let Some(silence) = silence {
                    deadline = tokio::time::Instant::now() + silence;
                }
            }
            Err(e) => break format!("reading from the broker: {e}"),
        }
    };
    tracing::debug!(%why, "AMQP connection ended");
    inner.end(why, by_gateway);
}

/// While the node is over its budget of deliveries, ends the channels
/// that hold more than the floor and whose session has stalled: in a
/// window of acked deliveries nothing new comes that would overrun them.
async fn sweep_loop(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(NODE_STALLED / 4).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.stop.is_cancelled() {
            return;
        }
        let Some(holding) = inner.holding.as_ref().filter(|h| h.node.over()) else {
            continue;
        };
        let channels: Vec<Arc<ChannelShared>> = lock(&inner.channels)
            .slots
            .iter()
            .flatten()
            .cloned()
            .collect();
        for channel in channels {
            let held = channel.held.load(Ordering::Relaxed);
            let stalled = {
                let state = lock(&channel.state);
                state.phase == Phase::Open
                    && state.last_take.is_none_or(|t| t.elapsed() > NODE_STALLED)
            };
            if stalled && held > holding.floor && holding.node.over() {
                inner.overrun(&channel, holding.node_overrun(held));
                channel.cut.cancel();
            }
        }
    }
}

/// Writes what sessions queued, in batches, and heart-beats when idle.
/// A write stuck on a broker that stopped reading is abandoned as soon as
/// the connection is declared dead.
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
    loop {
        tokio::select! {
            () = inner.queued.notified() => {}
            _ = ticks.tick(), if heartbeat.is_some() => {
                if !std::mem::take(&mut wrote) {
                    spare.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
                }
            }
            () = inner.stop.cancelled() => {
                let _ = tokio::time::timeout(CLOSE_WAIT, goodbye(&inner, &mut writer)).await;
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
            inner.queued_bytes.store(0, Ordering::Relaxed);
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
        tokio::select! {
            written = written => {
                if let Err(e) = written {
                    inner.fail(format!("writing to the broker: {e}"));
                    return;
                }
            }
            () = inner.stop.cancelled() => return,
        }
        spare.clear();
    }
}

/// The last writes of a connection that is ending: what was queued (a
/// close-ok for the broker's close), then, when the gateway itself is
/// closing it, `connection.close`.
async fn goodbye(inner: &Inner, writer: &mut (impl AsyncWrite + Unpin)) {
    let mut last = std::mem::take(&mut lock(&inner.outbox).bytes);
    if lock(&inner.failure).is_none() {
        let mut close = Outbox::default();
        close.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "stompgate closing".into(),
                class_id: 0,
                method_id: 0,
            })),
        );
        last.extend_from_slice(&close.bytes);
    }
    let _ = writer.write_all(&last).await;
    let _ = writer.flush().await;
}
