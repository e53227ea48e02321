//! The client's WebSocket as a session sees it: frames in (read only
//! when the socket may have something, charged to
//! stomp.node_inbound_bytes while unfinished, with the deadline of a frame
//! that is arriving), frames out (batched, flushed when the session is
//! idle or much waits, never past stomp.slow_client_timeout or the node
//! cutting the session off), and the end: the last frame, the close
//! frame, and the close grace that keeps the last frame from being lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::{waker_ref, ArcWake, AtomicWaker};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{timeout, Instant};
use tracing::debug;

use super::{End, SessionError};
use crate::budget::{Account, Budget};
use crate::config::Config;
use crate::metrics::{command_label, Metrics};
use crate::stomp::command::{self, ClientCommand, Connect, Version};
use crate::stomp::frame::{encode, Decoder, Frame, Limits};
use crate::websocket::{self, Message, WebSocket};

/// After our close frame, how long the peer gets to answer it. Reading
/// until then (instead of dropping the socket) keeps a TCP reset from
/// discarding the ERROR frame the client has not read yet.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most bytes read and dropped while a refused client is still sending
/// (an oversized message on its way) before the socket is let go.
const DRAIN_BYTES: usize = 16 << 20;

/// WebSocket close codes (RFC 6455).
pub(super) const CLOSE_NORMAL: u16 = 1000;
pub(super) const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
pub(super) const CLOSE_TRY_AGAIN: u16 = 1013;

/// Frames written to a client are flushed together when the session has
/// nothing else ready, or once this many bytes wait: one system call for a
/// burst of MESSAGEs instead of one each.
const FLUSH_BYTES: usize = 16 * 1024;

/// See [`Connection::cut`].
pub(super) type CutOff = Pin<Box<dyn Future<Output = ()> + Send>>;
/// While the node is over stomp.node_inbound_bytes, a client holding more
/// than this of unfinished frames is not read: one sending ordinary
/// frames holds far less.
const INBOUND_FLOOR: usize = 64 << 10;

/// The WebSocket with its decoder: reads frames, writes frames.
pub(super) struct Connection {
    ws: WebSocket,
    pub(super) decoder: Decoder,
    pub(super) escapes: bool,
    write_timeout: Duration,
    pub(super) last_write: Instant,
    pub(super) last_read: Instant,
    /// When the incomplete frame in the decoder began arriving.
    partial_since: Option<Instant>,
    /// When bytes of a WebSocket message not yet complete began arriving
    /// (a message in fragments, or one trickling in): it counts toward
    /// `stomp.frame_timeout` like a partial frame.
    message_since: Option<Instant>,
    /// `message_since` of the last whole message: a frame left unfinished
    /// by it began no earlier, and its clock does not start again when
    /// the message ends.
    last_message_since: Option<Instant>,
    /// Bytes written since the last flush (still in the socket's buffer).
    pub(super) unflushed: usize,
    /// What the client sent that is not a whole frame yet (in the decoder
    /// and in a WebSocket message still arriving), charged to
    /// stomp.node_inbound_bytes.
    inbound: Account,
    /// The socket's byte count when the last whole WebSocket message was in.
    message_start: u64,
    /// Resolves when the node cut the session's broker channel off for
    /// holding too much while its client did not read: writes waiting for
    /// the client give up then (see [`BrokerSession::cut_off`]).
    pub(super) cut: Option<CutOff>,
    read_ready: Arc<ReadReady>,
    /// `frames_sent{command="MESSAGE"}`, looked up once, not per delivery.
    messages_sent: prometheus::IntCounter,
    metrics: Arc<Metrics>,
}

/// Whether the socket may have something to read. The session's loop
/// polls for client frames on every turn, that is for every delivery, and
/// tungstenite zero-fills its read buffer on every attempt: that was a
/// third of the gateway's instructions in a fan-out. So the socket is read
/// again only once the waker given to the last read that found nothing
/// has fired.
struct ReadReady {
    ready: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for ReadReady {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.ready.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

/// What a read of the socket gave: a message (or the socket's error), or
/// only part of a message, which makes the loop look at its deadlines
/// again.
enum Read {
    Message(Result<Message, websocket::Error>),
    Partial,
}

/// What the client side produced: a message's worth of bytes, or its end.
pub(super) enum Inbound {
    Bytes,
    End(End),
}

impl Connection {
    pub(super) fn new(
        ws: WebSocket,
        config: &Config,
        metrics: Arc<Metrics>,
        inbound: &Arc<Budget>,
    ) -> Connection {
        let stomp = &config.stomp;
        Connection {
            ws,
            decoder: Decoder::new(Limits {
                max_frame_bytes: stomp.max_frame_bytes,
                max_headers: stomp.max_headers,
                max_header_bytes: stomp.max_header_bytes,
            }),
            escapes: true,
            write_timeout: stomp.slow_client_timeout,
            last_write: Instant::now(),
            last_read: Instant::now(),
            partial_since: None,
            message_since: None,
            last_message_since: None,
            unflushed: 0,
            inbound: inbound.account(),
            message_start: 0,
            cut: None,
            read_ready: Arc::new(ReadReady {
                ready: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
            messages_sent: metrics.frames_sent.with_label_values(&["MESSAGE"]),
            metrics,
        }
    }

    /// The socket's next message, read only when it may have one (see
    /// [`ReadReady`]).
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Read>> {
        self.read_ready.task.register(cx.waker());
        if !self.read_ready.ready.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(&self.read_ready);
        let before = self.ws.get_ref().bytes_read();
        let polled = self.ws.poll_next_unpin(&mut Context::from_waker(&waker));
        if polled.is_ready() {
            // More may wait in tungstenite's buffer, with no wake to come.
            self.read_ready.ready.store(true, Ordering::Release);
            self.last_message_since = self.message_since.take();
            self.message_start = self.ws.get_ref().bytes_read();
        } else if self.ws.get_ref().bytes_read() != before {
            // Bytes came, but no whole message: the loop is told, so that
            // it arms stomp.frame_timeout for the message (the socket's
            // waker is registered; the next poll waits for it).
            self.message_since.get_or_insert_with(Instant::now);
            return Poll::Ready(Some(Read::Partial));
        }
        polled.map(|message| message.map(Read::Message))
    }

    /// When the frame or WebSocket message now arriving must be complete.
    pub(super) fn frame_deadline(&self, frame_timeout: Duration) -> Option<Instant> {
        let since = match (self.partial_since, self.message_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        since.map(|t| t + frame_timeout)
    }

    /// Reads until the first frame; it must be CONNECT or STOMP.
    pub(super) async fn first_frame(&mut self) -> Result<(Connect, Option<String>), End> {
        let frame = loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    self.count_received(&frame);
                    break frame;
                }
                Ok(None) => match self.read().await {
                    Inbound::Bytes => {}
                    Inbound::End(end) => return Err(end),
                },
                Err(e) => return Err(self.fail(e.into(), None).await),
            }
        };
        let receipt = frame.get("receipt").map(str::to_owned);
        match ClientCommand::from_frame(frame, Version::V1_2) {
            Ok(ClientCommand::Connect(connect)) => Ok((connect, receipt)),
            Ok(other) => {
                let error = SessionError::Protocol(format!(
                    "{} before CONNECT: the first frame must be CONNECT or STOMP",
                    other.name()
                ));
                Err(self.fail(error, receipt.as_deref()).await)
            }
            Err(e) => Err(self.fail(e.into(), receipt.as_deref()).await),
        }
    }

    /// One WebSocket message into the decoder. Cancel-safe: `next()` on
    /// the socket loses nothing when dropped.
    pub(super) async fn read(&mut self) -> Inbound {
        let read = std::future::poll_fn(|cx| self.poll_message(cx)).await;
        let inbound = self.take_read(read).await;
        self.charge_inbound();
        inbound
    }

    /// Charges what the client has begun sending and not finished.
    fn charge_inbound(&mut self) {
        let arriving = match self.message_since {
            Some(_) => self.ws.get_ref().bytes_read() - self.message_start,
            None => 0,
        };
        let arriving = usize::try_from(arriving).unwrap_or(usize::MAX);
        self.inbound
            .set(self.decoder.buffered().saturating_add(arriving));
    }

    /// Whether the node is over stomp.node_inbound_bytes and this client
    /// holds enough of it to wait: it is not read until the node is under.
    pub(super) fn held_back(&self) -> bool {
        self.inbound.bytes() > INBOUND_FLOOR && self.inbound.budget().over()
    }

    async fn take_read(&mut self, read: Option<Read>) -> Inbound {
        match read {
            Some(Read::Message(Ok(message))) => {
                self.last_read = Instant::now();
                if message.is_close() {
                    // tungstenite queued the answering close frame (RFC
                    // 6455 §5.5.1): send it, so the client sees a clean
                    // close rather than 1006.
                    let _ = timeout(CLOSE_GRACE, self.ws.flush()).await;
                    return Inbound::End(End::PeerGone);
                }
                if let Some(data) = websocket::data(&message) {
                    self.decoder.feed(data);
                }
                Inbound::Bytes
            }
            Some(Read::Partial) => Inbound::Bytes,
            Some(Read::Message(Err(e))) => {
                debug!(error = %e, "websocket read failed");
                if let websocket::Error::Capacity(_) = e {
                    self.refused("server.max_message_bytes");
                    let error = command::error(
                        "frame too large",
                        "WebSocket message larger than server.max_message_bytes",
                        None,
                    );
                    if self.write(&error).await.is_ok()
                        && self.send_close(CLOSE_TOO_BIG).await.is_ok()
                    {
                        self.drain().await;
                    }
                    return Inbound::End(End::Failed);
                }
                Inbound::End(End::PeerGone)
            }
            None => Inbound::End(End::PeerGone),
        }
    }

    /// Counts a refusal by the limit (config key) that made it.
    pub(super) fn refused(&self, key: &'static str) {
        debug_assert!(
            crate::metrics::REFUSAL_LIMITS.contains(&key),
            "{key} is missing from metrics::REFUSAL_LIMITS"
        );
        self.metrics.refusals.with_label_values(&[key]).inc();
    }

    /// Remembers when the frame now in the decoder began, for
    /// `stomp.frame_timeout`; forgets it once nothing is left over.
    pub(super) fn note_partial(&mut self) {
        self.charge_inbound();
        if self.decoder.buffered() == 0 {
            self.partial_since = None;
        } else if self.partial_since.is_none() {
            let began = self.last_message_since.unwrap_or_else(Instant::now);
            self.partial_since = Some(began);
        }
    }

    pub(super) fn count_received(&self, frame: &Frame) {
        self.metrics
            .frames_received
            .with_label_values(&[command_label(&frame.command)])
            .inc();
    }

    /// One frame, one WebSocket message: text when it is all UTF-8. It
    /// goes out with the next [`Connection::flush`], or at once when much
    /// is waiting.
    pub(super) async fn write(&mut self, frame: &Frame) -> Result<(), End> {
        let command = command_label(&frame.command);
        self.metrics.frames_sent.with_label_values(&[command]).inc();
        if command == "ERROR" {
            // ERROR messages are the fixed summaries built in this crate.
            let reason = frame.get("message").unwrap_or("unknown");
            debug_assert!(
                crate::metrics::ERROR_REASONS.contains(&reason),
                "{reason:?} is missing from metrics::ERROR_REASONS"
            );
            self.metrics.errors.with_label_values(&[reason]).inc();
        }
        self.write_bytes(encode(frame, self.escapes)).await
    }

    /// A MESSAGE, encoded by the session with [`FrameWriter`].
    pub(super) async fn write_message(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        self.messages_sent.inc();
        self.write_bytes(bytes).await
    }

    async fn write_bytes(&mut self, bytes: Vec<u8>) -> Result<(), End> {
        let len = bytes.len();
        let message = match String::from_utf8(bytes) {
            Ok(text) => Message::text(text),
            Err(e) => Message::binary(e.into_bytes()),
        };
        // `feed` waits only when the socket's buffer is full and the
        // client is not reading: that is what the write timeout catches.
        Self::timed(self.write_timeout, &mut self.cut, self.ws.feed(message)).await?;
        self.last_write = Instant::now();
        self.unflushed += len;
        if self.unflushed >= FLUSH_BYTES {
            // Not waiting here: a session on the fast path first moves to
            // acked consumption when the client is not reading
            // (`backed_up`); the rest is flushed when the session is idle.
            self.try_flush().await?;
        }
        Ok(())
    }

    /// Flushes if the socket takes it all now; false if it would wait.
    async fn try_flush(&mut self) -> Result<bool, End> {
        let ws = &mut self.ws;
        match std::future::poll_fn(|cx| Poll::Ready(ws.poll_flush_unpin(cx))).await {
            Poll::Ready(Ok(())) => {
                self.unflushed = 0;
                Ok(true)
            }
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "websocket write failed");
                Err(End::PeerGone)
            }
            Poll::Pending => Ok(false),
        }
    }

    /// Whether the next write or flush would wait: the client is not
    /// reading as fast as frames come.
    pub(super) async fn backed_up(&mut self) -> Result<bool, End> {
        let ws = &mut self.ws;
        if std::future::poll_fn(|cx| Poll::Ready(ws.poll_ready_unpin(cx).is_pending())).await {
            return Ok(true);
        }
        if self.unflushed >= FLUSH_BYTES {
            return Ok(!self.try_flush().await?);
        }
        Ok(false)
    }

    /// Flushes if the client takes it all within `limit`; false if not
    /// (what is left is flushed later).
    pub(super) async fn flush_within(&mut self, limit: Duration) -> Result<bool, End> {
        match timeout(limit, self.ws.flush()).await {
            Ok(Ok(())) => {
                self.unflushed = 0;
                Ok(true)
            }
            Ok(Err(e)) => {
                debug!(error = %e, "websocket write failed");
                Err(End::PeerGone)
            }
            Err(_) => Ok(false),
        }
    }

    /// Sends what [`Connection::write`] buffered.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        Self::timed(self.write_timeout, &mut self.cut, self.ws.flush()).await?;
        self.unflushed = 0;
        Ok(())
    }

    /// One message now, with whatever was buffered before it.
    pub(super) async fn send(&mut self, message: Message) -> Result<(), End> {
        Self::timed(self.write_timeout, &mut self.cut, self.ws.send(message)).await?;
        self.last_write = Instant::now();
        self.unflushed = 0;
        Ok(())
    }

    /// A write that may wait for the client: for at most `limit`, and not
    /// past the node cutting the session off (see [`Connection::cut`]).
    async fn timed(
        limit: Duration,
        cut: &mut Option<CutOff>,
        write: impl Future<Output = Result<(), websocket::Error>>,
    ) -> Result<(), End> {
        let cut_off = async {
            match cut {
                Some(cut) => cut.await,
                None => std::future::pending().await,
            }
        };
        // Biased: a write that completes at once never polls the cut.
        let written = tokio::select! {
            biased;
            written = timeout(limit, write) => written,
            () = cut_off => return Err(End::CutOff),
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "websocket write failed");
                Err(End::PeerGone)
            }
            Err(_) => Err(End::SlowClient),
        }
    }

    async fn send_close(&mut self, code: u16) -> Result<(), End> {
        self.send(websocket::close(code)).await
    }

    /// Sends ERROR for `error` and the close frame.
    pub(super) async fn fail(&mut self, error: SessionError, receipt: Option<&str>) -> End {
        debug!(%error, "protocol error");
        if let Some(key) = error.limit_key() {
            self.refused(key);
        }
        let frame = command::error(error.summary(), &error.to_string(), receipt);
        self.finish(Some(frame), CLOSE_NORMAL).await;
        End::Failed
    }

    /// Last frame (if any), close frame, then waits a little for the peer's
    /// close so that the last frame is read before the socket goes.
    pub(super) async fn finish(&mut self, last: Option<Frame>, code: u16) {
        // Nothing more is read as frames: what was begun goes now, not
        // after the close handshake (seconds, for a client that does not
        // answer), so others waiting on stomp.node_inbound_bytes go on.
        self.decoder.discard();
        self.message_since = None;
        self.inbound.set(0);
        if let Some(frame) = last {
            if self.write(&frame).await.is_err() {
                return;
            }
        }
        if self.send_close(code).await.is_err() {
            return;
        }
        let answered = timeout(CLOSE_GRACE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(message)) if message.is_close() => return true,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return false,
                }
            }
        })
        .await;
        // Not answered: the client may still be sending (an oversized
        // frame or message on its way). Dropping the socket with unread
        // bytes would make the kernel reset it, and a reset can destroy
        // the ERROR before the client reads it.
        if answered != Ok(true) {
            self.drain().await;
        }
    }

    /// After the close frame: ends our side of the TCP connection, then
    /// reads and drops what the client still sends until it closes
    /// (bounded by CLOSE_GRACE and DRAIN_BYTES), below the WebSocket
    /// protocol, which may have given up on the stream already.
    async fn drain(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = timeout(CLOSE_GRACE, self.ws.flush()).await;
        let io = self.ws.get_mut();
        let _ = timeout(CLOSE_GRACE, io.shutdown()).await;
        let mut buf = vec![0u8; 16 << 10];
        let mut left = DRAIN_BYTES;
        let _ = timeout(CLOSE_GRACE, async {
            while left > 0 {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}
