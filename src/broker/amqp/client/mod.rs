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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, channel, AMQPClass, BasicProperties};
use amq_protocol::types::ShortString;
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{BrokerError, Confirmed};
use crate::budget::Held;

mod frames;
mod handle;
mod handshake;
mod holding;
mod reader;
mod wire;
mod writer;

use frames::{close_method, Outbox};
use handshake::{guard_socket, handshake, tls};
use holding::sweep_loop;
use reader::read_loop;
use writer::write_loop;

pub use handle::Channel;
pub use handshake::redacted;
pub use holding::Holding;

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
    /// The user the connection logged in as: RabbitMQ checks a publish's
    /// `user_id` against it.
    user: String,
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
            user: uri.authority.userinfo.username.clone(),
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

    /// The user the connection logged in as.
    pub fn user(&self) -> &str {
        &self.inner.user
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
}
