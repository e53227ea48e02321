//! The WebSocket upgrade, done here rather than by warp's `ws()` filter so
//! that the socket's buffers can be sized: tungstenite's default read
//! buffer (128 KiB) is allocated for every connection and zero-filled on
//! every read attempt, which made it the largest part of an idle
//! connection's memory and of the CPU spent per delivered message.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
pub use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
pub use tokio_tungstenite::tungstenite::{Error, Message};

pub type WebSocket = WebSocketStream<Counted<TokioIo<hyper::upgrade::Upgraded>>>;

/// The client's socket, counting the bytes read from it: a WebSocket
/// message sent in fragments (or one frame at a trickle) shows as bytes
/// read with no message yet, which `stomp.frame_timeout` bounds like a
/// partial STOMP frame.
pub struct Counted<T> {
    inner: T,
    read: AtomicU64,
}

impl<T> Counted<T> {
    /// Bytes read from the socket so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.read.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request to upgrade to a WebSocket, checked as RFC 6455 asks.
pub struct Upgrade {
    accept: String,
    on_upgrade: OnUpgrade,
}

/// Matches `GET` requests; for those that are not a valid WebSocket
/// upgrade, `Err` says why (to be answered 400: this path serves nothing
/// else).
pub fn upgrade(
) -> impl Filter<Extract = (Result<Upgrade, &'static str>,), Error = Rejection> + Clone {
    warp::get()
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .map(|headers: HeaderMap, on_upgrade: Option<OnUpgrade>| {
            let bad = Err;
            let has = |name: &str, token: &str| {
                headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|v| v.trim().eq_ignore_ascii_case(token))
            };
            if !has("connection", "upgrade") || !has("upgrade", "websocket") {
                return bad("expected a WebSocket upgrade\n");
            }
            if !has("sec-websocket-version", "13") {
                return bad("unsupported sec-websocket-version (13 is)\n");
            }
            let Some(key) = headers.get("sec-websocket-key") else {
                return bad("missing sec-websocket-key\n");
            };
            let Some(on_upgrade) = on_upgrade else {
                return bad("this connection cannot be upgraded\n");
            };
            Ok(Upgrade {
                accept: derive_accept_key(key.as_bytes()),
                on_upgrade,
            })
        })
}

impl Upgrade {
    /// The 101 response; once the client has it, `run` gets the socket.
    pub fn reply<F, U>(
        self,
        config: WebSocketConfig,
        subprotocol: Option<&'static str>,
        run: F,
    ) -> Response
    where
        F: FnOnce(WebSocket) -> U + Send + 'static,
        U: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = Counted {
                        inner: TokioIo::new(upgraded),
                        read: AtomicU64::new(0),
                    };
                    run(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
                        .await
                }
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
            }
        });
        let mut response = Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert("connection", "upgrade".parse().expect("valid header"));
        headers.insert("upgrade", "websocket".parse().expect("valid header"));
        headers.insert(
            "sec-websocket-accept",
            self.accept.parse().expect("base64 is a valid header value"),
        );
        if let Some(subprotocol) = subprotocol {
            headers.insert(
                "sec-websocket-protocol",
                subprotocol.parse().expect("valid header"),
            );
        }
        response
    }
}

/// The bytes of a data message; None for control messages.
pub fn data(message: &Message) -> Option<&[u8]> {
    match message {
        Message::Text(text) => Some(text.as_bytes()),
        Message::Binary(bytes) => Some(bytes),
        _ => None,
    }
}

/// A close message with `code` and no reason.
pub fn close(code: u16) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    }))
}
