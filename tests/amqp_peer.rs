//! Protocol tests for the gateway's AMQP client against a scripted peer: a
//! real TCP server on loopback that speaks AMQP frames (amq-protocol's
//! codec) and misbehaves on cue — freezes, stops reading, blocks the
//! connection, crosses closes, answers the wrong method, sends strings
//! that are not UTF-8 and frames cut short. The same client is tested
//! against the real RabbitMQ in `amqp_link.rs` and `faults.rs`; these
//! cases are the ones a real broker cannot be made to produce on demand.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, queue, AMQPClass, BasicProperties};
use amq_protocol::types::{FieldTable, LongString};
use bytes::{Buf, BytesMut};
use stompgate::broker::amqp::client::{Channel, Connection, Message, Observer, Options};
use stompgate::broker::{BrokerError, Confirmed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest any step of a test waits for the other side.
const WAIT: Duration = Duration::from_secs(5);

/// What the client reported, for the tests to look at.
#[derive(Default)]
struct Seen {
    blocked: Mutex<Vec<Option<String>>>,
    lenient: AtomicU32,
    ended: Mutex<Option<String>>,
}

impl Observer for Seen {
    fn blocked(&self, reason: Option<&str>) {
        self.blocked.lock().unwrap().push(reason.map(str::to_owned));
    }
    fn lenient(&self, dropped: u32) {
        self.lenient.fetch_add(dropped, Ordering::Relaxed);
    }
    fn ended(&self, why: &str, _by_gateway: bool) {
        *self.ended.lock().unwrap() = Some(why.to_owned());
    }
}

/// One accepted connection, from the broker's side.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

/// What the peer tells the client in `connection.tune`.
struct Tune {
    channel_max: u16,
    heartbeat: u16,
}

const TUNE: Tune = Tune {
    channel_max: 2047,
    heartbeat: 0,
};

/// Listens on loopback; `connect` opens the client against it and runs
/// the handshake from the peer's side.
async fn connect(tune: Tune, call_timeout: Duration) -> (Connection, Peer, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "amqp://guest:guest@{}/%2f?heartbeat={}",
        listener.local_addr().unwrap(),
        tune.heartbeat
    );
    let seen = Arc::new(Seen::default());
    let mut options = Options::new("peer test");
    options.call_timeout = call_timeout;
    options.observer = seen.clone();
    let opening = tokio::spawn(async move { Connection::open(&url, &options).await });
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the client connects")
        .unwrap();
    let mut peer = Peer {
        stream,
        buf: BytesMut::new(),
    };
    peer.handshake(&tune).await;
    let connection = tokio::time::timeout(WAIT, opening)
        .await
        .expect("the handshake ends")
        .unwrap()
        .expect("the client accepts the handshake");
    (connection, peer, seen)
}

impl Peer {
    async fn handshake(&mut self, tune: &Tune) {
        let mut header = [0u8; 8];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header, b"AMQP\x00\x00\x09\x01");
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: FieldTable::default(),
                mechanisms: LongString::from("PLAIN"),
                locales: LongString::from("en_US"),
            })),
        )
        .await;
        let (_, start_ok) = self.method().await;
        assert!(matches!(
            start_ok,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(_))
        ));
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: tune.channel_max,
                frame_max: 131_072,
                heartbeat: tune.heartbeat,
            })),
        )
        .await;
        let (_, tune_ok) = self.method().await;
        let AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)) = tune_ok else {
            panic!("expected tune-ok, got {tune_ok:?}");
        };
        assert_eq!(
            tune_ok.heartbeat, tune.heartbeat,
            "the URL's heart-beat wins"
        );
        let (_, open) = self.method().await;
        assert!(matches!(
            open,
            AMQPClass::Connection(connection::AMQPMethod::Open(_))
        ));
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        )
        .await;
    }

    async fn send(&mut self, frame: AMQPFrame) {
        let (bytes, _) = gen_frame(&frame)(WriteContext::from(Vec::new()))
            .unwrap()
            .into_inner();
        self.stream.write_all(&bytes).await.unwrap();
    }

    async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        self.send(AMQPFrame::Method(channel, method)).await;
    }

    /// A frame written by hand: type, channel, payload, end marker.
    async fn send_raw(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&channel.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes.push(0xCE);
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// The next frame's type, channel and payload; heart-beats skipped.
    async fn frame(&mut self) -> (u8, u16, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes(self.buf[3..7].try_into().unwrap()) as usize;
                if self.buf.len() >= 8 + size {
                    let kind = self.buf[0];
                    let channel = u16::from_be_bytes([self.buf[1], self.buf[2]]);
                    let payload = self.buf[7..7 + size].to_vec();
                    assert_eq!(self.buf[7 + size], 0xCE, "frame end marker");
                    self.buf.advance(8 + size);
                    if kind == 8 {
                        continue;
                    }
                    return (kind, channel, payload);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, self.stream.read_buf(&mut self.buf))
                .await
                .expect("the peer hears from the client in time")
                .unwrap();
            assert!(read > 0, "the client closed the socket");
        }
    }

    /// The next method the client sent, skipping content frames.
    async fn method(&mut self) -> (u16, AMQPClass) {
        loop {
            let (kind, channel, payload) = self.frame().await;
            if kind == 1 {
                let (_, method) = amq_protocol::protocol::parse_class(&payload[..]).unwrap();
                return (channel, method);
            }
        }
    }

    /// Answers the client's `channel.open`; returns its id.
    async fn accept_channel(&mut self) -> u16 {
        let (id, open) = self.method().await;
        assert!(
            matches!(open, AMQPClass::Channel(channel::AMQPMethod::Open(_))),
            "expected channel.open, got {open:?}"
        );
        self.send_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        )
        .await;
        id
    }

    /// Whether the client closed the socket within `within`.
    async fn hung_up_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => self.buf.clear(),
            }
        }
    }
}

fn close_ok() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))
}

fn is_close(method: &AMQPClass) -> bool {
    matches!(method, AMQPClass::Channel(channel::AMQPMethod::Close(_)))
}

fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: true,
        auto_delete: true,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

async fn open_channel(connection: &Connection, peer: &mut Peer) -> (Channel, u16) {
    let (channel, id) = tokio::join!(connection.channel(), peer.accept_channel());
    (channel.expect("the channel opens"), id)
}

/// The next delivery for consumer `tag`, within WAIT.
async fn take(channel: &Channel, tag: &str) -> Result<Message, BrokerError> {
    let mut into = VecDeque::new();
    tokio::time::timeout(
        WAIT,
        std::future::poll_fn(|cx| channel.poll_take(cx, tag, &mut into, 1)),
    )
    .await
    .expect("a delivery in time");
    into.pop_front()
        .expect("a delivery, not the consumer's end")
}

/// The broker freezes (reads and writes nothing) while the client has
/// more to write than the socket holds: the writer is stuck, and the
/// reader still declares the broker dead after two heart-beat intervals.
#[tokio::test]
async fn a_frozen_broker_is_declared_dead_while_a_write_is_stuck() {
    let tune = Tune {
        heartbeat: 1,
        ..TUNE
    };
    let (connection, mut peer, seen) = connect(tune, WAIT).await;
    let (channel, _) = open_channel(&connection, &mut peer).await;
    let frozen = Instant::now();
    // 32 MiB: far more than loopback socket buffers take unread.
    let body = vec![b'x'; 1 << 20];
    let mut confirms = Vec::new();
    for _ in 0..32 {
        let publish = channel.publish(
            "amq.topic",
            "k",
            BasicProperties::default(),
            FieldTable::default(),
            &body,
        );
        confirms.push(publish.expect("queued"));
    }
    let why = tokio::time::timeout(Duration::from_secs(4), connection.closed())
        .await
        .expect("declared dead within 2 heart-beats + 1 s, however stuck the write");
    let took = frozen.elapsed();
    assert!(
        why.contains("heart-beat"),
        "the reason names the silence: {why}"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "not before 2 intervals: {took:?}"
    );
    assert!(!connection.is_open());
    for confirm in confirms {
        assert!(matches!(
            confirm.await,
            Ok(Err(BrokerError::Unavailable(_)))
        ));
    }
    assert!(seen.ended.lock().unwrap().is_some(), "the owner is told");
    drop(peer);
}

/// Heart-beats from the broker keep an idle connection alive: silence,
/// not idleness, is what kills it.
#[tokio::test]
async fn heart_beats_from_the_broker_keep_the_connection() {
    let tune = Tune {
        heartbeat: 1,
        ..TUNE
    };
    let (connection, mut peer, _) = connect(tune, WAIT).await;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        peer.send(AMQPFrame::Heartbeat).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(connection.is_open(), "4 s of heart-beats, no other frame");
}

/// A session dropped while its `channel.open` waits for an answer (an
/// opening that timed out): the close follows the open on the wire, never
/// precedes it, and the id is not handed out again until the broker
/// agreed to the close.
#[tokio::test]
async fn a_channel_dropped_while_opening_is_closed_after_its_open() {
    let tune = Tune {
        channel_max: 1,
        ..TUNE
    };
    let (connection, mut peer, _) = connect(tune, WAIT).await;
    let opening = tokio::time::timeout(Duration::from_millis(300), connection.channel());
    let ((), (id, open)) = tokio::join!(
        async {
            assert!(
                opening.await.is_err(),
                "no open-ok yet: the opening times out"
            );
        },
        peer.method()
    );
    assert!(matches!(
        open,
        AMQPClass::Channel(channel::AMQPMethod::Open(_))
    ));
    // Only one id exists, and it is still taken.
    assert!(matches!(
        connection.channel().await,
        Err(BrokerError::Unavailable(why)) if why.contains("no free channel")
    ));
    peer.send_method(
        id,
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
    )
    .await;
    let (closed, close) = peer.method().await;
    assert_eq!(closed, id);
    assert!(is_close(&close), "then its close: {close:?}");
    assert!(connection.channel_max() == 1 && connection.is_open());
    peer.send_method(id, close_ok()).await;
    // The close-ok frees the id for a new channel.
    let (_, again) = open_channel_retrying(&connection, &mut peer).await;
    assert_eq!(again, id);
}

/// Opens a channel once the client has freed an id: the close-ok is read
/// by the client's own task, so the first tries may come too early and
/// are refused at once, without a word to the peer.
async fn open_channel_retrying(connection: &Connection, peer: &mut Peer) -> (Channel, u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut attempt = Box::pin(connection.channel());
        if let std::task::Poll::Ready(result) = futures_util::poll!(attempt.as_mut()) {
            match result {
                Err(BrokerError::Unavailable(why)) if why.contains("no free channel") => {
                    assert!(Instant::now() < deadline, "the id was never freed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => panic!("opening a channel: {e}"),
                Ok(_) => panic!("a channel opened without the peer's answer"),
            }
        }
        let (channel, id) = tokio::join!(attempt, peer.accept_channel());
        return (channel.expect("the channel opens"), id);
    }
}

/// Both sides close the same channel at once: the broker's close reaches
/// the client after it sent its own. The client answers it, and the id
/// stays taken until the answer to its own close came, so that answer,
/// still on its way, cannot land on a new channel with the same id.
#[tokio::test]
async fn crossed_closes_free_the_id_only_after_both_answers() {
    let tune = Tune {
        channel_max: 1,
        ..TUNE
    };
    let (connection, mut peer, _) = connect(tune, WAIT).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    let ((), ()) = tokio::join!(
        async {
            let closed = channel.close().await;
            assert!(
                matches!(&closed, Err(BrokerError::Refused(why)) if why.starts_with("406")),
                "the broker's reason: {closed:?}"
            );
        },
        async {
            let (on, ours) = peer.method().await;
            assert_eq!(on, id);
            assert!(is_close(&ours));
            peer.send_method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 406,
                    reply_text: "PRECONDITION_FAILED - crossed".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
            let (_, answer) = peer.method().await;
            assert!(matches!(
                answer,
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))
            ));
        }
    );
    // Still owed its close-ok: the only id is taken.
    assert!(matches!(
        connection.channel().await,
        Err(BrokerError::Unavailable(why)) if why.contains("no free channel")
    ));
    peer.send_method(id, close_ok()).await;
    let (_, again) = open_channel_retrying(&connection, &mut peer).await;
    assert_eq!(again, id);
    assert!(
        connection.is_open(),
        "a channel's close never ends the connection"
    );
}

/// A reply of the wrong kind (bind-ok for a declare) fails that channel
/// only: the call errs, the channel is closed, the connection and its
/// other channels go on.
#[tokio::test]
async fn a_reply_of_the_wrong_kind_ends_its_channel_only() {
    let (connection, mut peer, _) = connect(TUNE, WAIT).await;
    let (bystander, _) = open_channel(&connection, &mut peer).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    let (result, ()) = tokio::join!(channel.call(declare("q")), async {
        let (on, declare) = peer.method().await;
        assert_eq!(on, id);
        assert!(matches!(
            declare,
            AMQPClass::Queue(queue::AMQPMethod::Declare(_))
        ));
        peer.send_method(
            id,
            AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
        )
        .await;
    });
    assert!(matches!(result, Err(BrokerError::Unavailable(why)) if why.contains("nobody asked")));
    let (on, close) = peer.method().await;
    assert_eq!(on, id);
    assert!(is_close(&close));
    peer.send_method(id, close_ok()).await;
    assert!(connection.is_open());
    assert!(bystander.is_open());
    let (ok, ()) = tokio::join!(bystander.call(declare("r")), async {
        let (on, _) = peer.method().await;
        peer.send_method(
            on,
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: "r".into(),
                message_count: 0,
                consumer_count: 0,
            })),
        )
        .await;
    });
    ok.expect("the other channel still works");
}

/// A broker that never answers a method: the call gives up after the call
/// timeout, and the channel is closed rather than left in doubt.
#[tokio::test]
async fn an_unanswered_call_is_bounded_by_the_call_timeout() {
    let (connection, mut peer, _) = connect(TUNE, Duration::from_millis(500)).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    let asked = Instant::now();
    let (result, (_, declare)) = tokio::join!(channel.call(declare("q")), peer.method());
    assert!(matches!(
        declare,
        AMQPClass::Queue(queue::AMQPMethod::Declare(_))
    ));
    let took = asked.elapsed();
    assert!(
        matches!(&result, Err(BrokerError::Unavailable(why)) if why.contains("amqp.call_timeout")),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(2), "bounded: {took:?}");
    let (on, close) = peer.method().await;
    assert_eq!(on, id);
    assert!(is_close(&close));
    // A late answer to the declare is ignored: the channel is closing.
    peer.send_method(
        id,
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
            queue: "q".into(),
            message_count: 0,
            consumer_count: 0,
        })),
    )
    .await;
    peer.send_method(id, close_ok()).await;
    let (_, next) = open_channel(&connection, &mut peer).await;
    assert_ne!(next, id, "ids go round rather than reusing the last one");
    assert!(connection.is_open());
}

/// `connection.blocked` is a state the owner can read, reported with the
/// broker's reason, and lifted by `connection.unblocked`.
#[tokio::test]
async fn connection_blocked_is_a_state() {
    let (connection, mut peer, seen) = connect(TUNE, WAIT).await;
    peer.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
            reason: "low on memory".into(),
        })),
    )
    .await;
    wait_for(|| connection.blocked().is_some()).await;
    assert_eq!(connection.blocked().as_deref(), Some("low on memory"));
    peer.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
    )
    .await;
    wait_for(|| connection.blocked().is_none()).await;
    assert_eq!(
        *seen.blocked.lock().unwrap(),
        [Some("low on memory".to_owned()), None]
    );
    assert!(connection.is_open());
}

/// `channel.flow` with active false holds publishes back until the broker
/// lets them go again; the client answers flow-ok both times.
#[tokio::test]
async fn channel_flow_is_obeyed() {
    let (connection, mut peer, _) = connect(TUNE, WAIT).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    assert!(channel.writable());
    let flow = |active| AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active }));
    peer.send_method(id, flow(false)).await;
    let (_, ok) = peer.method().await;
    assert!(matches!(
        ok,
        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
            active: false
        }))
    ));
    assert!(!channel.writable());
    let resumed = channel.until_writable();
    peer.send_method(id, flow(true)).await;
    tokio::time::timeout(WAIT, resumed)
        .await
        .expect("writable again once the flow resumes");
    let (_, ok) = peer.method().await;
    assert!(matches!(
        ok,
        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
            active: true
        }))
    ));
}

/// A content header written as a careless publisher would (a header name
/// and a message-id that are not UTF-8; RabbitMQ passes both on): the
/// message is delivered without them, the owner is told, and the
/// connection goes on.
#[tokio::test]
async fn a_delivery_with_strings_that_are_not_utf8_is_delivered() {
    let (connection, mut peer, seen) = connect(TUNE, WAIT).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    let (consumed, ()) = tokio::join!(channel.consume("q", "c", true), async {
        let (_, consume) = peer.method().await;
        assert!(matches!(
            consume,
            AMQPClass::Basic(basic::AMQPMethod::Consume(_))
        ));
        peer.send_method(
            id,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: "c".into(),
            })),
        )
        .await;
    });
    consumed.unwrap();
    for tag in 1..=2u64 {
        peer.send_method(
            id,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "c".into(),
                delivery_tag: tag,
                redelivered: false,
                exchange: "amq.topic".into(),
                routing_key: "no01".into(),
            })),
        )
        .await;
        peer.send_raw(2, id, &common::content_header_with_bad_strings(5))
            .await;
        peer.send_raw(3, id, b"hello").await;
    }
    for tag in 1..=2u64 {
        let message = take(&channel, "c").await.expect("delivered");
        assert_eq!(message.delivery_tag, tag);
        assert_eq!(&message.body[..], b"hello");
        let headers = message.properties.headers().clone().unwrap();
        let names: Vec<_> = headers.inner().keys().map(|k| k.to_string()).collect();
        assert_eq!(names, ["good"]);
        assert_eq!(message.properties.message_id(), &None);
    }
    assert_eq!(
        seen.lenient.load(Ordering::Relaxed),
        4,
        "two strings in each"
    );
    assert!(connection.is_open() && channel.is_open());
}

/// A method whose payload cannot be read ends its channel, not the
/// connection.
#[tokio::test]
async fn a_malformed_method_ends_its_channel_only() {
    let (connection, mut peer, _) = connect(TUNE, WAIT).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    // basic.deliver, cut off after the consumer tag's length.
    peer.send_raw(1, id, &[0, 60, 0, 60, 200]).await;
    let (on, close) = peer.method().await;
    assert_eq!(on, id);
    assert!(is_close(&close), "the client closes the channel: {close:?}");
    assert!(!channel.is_open());
    assert!(connection.is_open());
}

/// A frame cut short by the broker's end of the socket fails the
/// connection with a reason, and every call on it.
#[tokio::test]
async fn a_frame_cut_short_by_a_hang_up_fails_the_connection() {
    let (connection, mut peer, seen) = connect(TUNE, WAIT).await;
    let (channel, _) = open_channel(&connection, &mut peer).await;
    peer.stream
        .write_all(&[1, 0, 1, 0, 0, 0, 40, 0, 60])
        .await
        .unwrap();
    drop(peer);
    let why = tokio::time::timeout(WAIT, connection.closed())
        .await
        .expect("the end is noticed");
    assert!(why.contains("closed"), "{why}");
    assert!(matches!(
        channel.call(declare("q")).await,
        Err(BrokerError::Unavailable(_))
    ));
    assert!(seen.ended.lock().unwrap().is_some());
}

/// A frame larger than the negotiated frame_max is a framing fault: the
/// connection fails at once instead of waiting for megabytes.
#[tokio::test]
async fn a_frame_over_frame_max_fails_the_connection() {
    let (connection, mut peer, _) = connect(TUNE, WAIT).await;
    peer.stream
        .write_all(&[3, 0, 1, 0x7f, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let why = tokio::time::timeout(WAIT, connection.closed())
        .await
        .expect("the fault is noticed at once");
    assert!(why.contains("frame_max"), "{why}");
    assert!(peer.hung_up_within(WAIT).await, "and the socket is closed");
}

/// A confirm the broker refuses (`basic.nack`) is an answer about that
/// publish, not a fault: the next publish on the channel is confirmed.
#[tokio::test]
async fn a_nack_answers_its_publish_only() {
    let (connection, mut peer, _) = connect(TUNE, WAIT).await;
    let (channel, id) = open_channel(&connection, &mut peer).await;
    let publish = || {
        channel
            .publish(
                "amq.topic",
                "k",
                BasicProperties::default(),
                FieldTable::default(),
                b"x",
            )
            .expect("queued")
    };
    let (first, second) = (publish(), publish());
    peer.send_method(
        id,
        AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 1,
            multiple: false,
            requeue: false,
        })),
    )
    .await;
    peer.send_method(
        id,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 2,
            multiple: false,
        })),
    )
    .await;
    assert_eq!(first.await.unwrap().unwrap(), Confirmed::Nacked);
    assert_eq!(second.await.unwrap().unwrap(), Confirmed::Routed);
    assert!(channel.is_open());
}

async fn wait_for(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
