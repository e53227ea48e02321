//! Just enough STOMP 1.2 over WebSocket for a load generator: connect,
//! subscribe, send, and a frame scanner that does not allocate. Kept apart
//! from the gateway's own codec so the benchmark measures servers with a
//! client that shares no code with one of them.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where to connect and as whom.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: String,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// Bounds the WebSocket handshake, CONNECT and the first RECEIPT.
    pub timeout: Duration,
}

/// One frame inside a WebSocket message, borrowed.
pub struct FrameRef<'a> {
    pub command: &'a [u8],
    head: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// The first header of that name (raw: the benchmark's values need no
    /// unescaping).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.head.split(|&b| b == b'\n').find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let rest = line.strip_prefix(name.as_bytes())?;
            rest.strip_prefix(b":")
        })
    }
}

/// Calls `each` for every frame in one WebSocket message, skipping
/// heart-beat EOLs. Frames split across messages do not occur with the
/// servers measured (both send one frame per message); a partial frame is
/// reported as an error rather than misread.
pub fn scan(mut data: &[u8], mut each: impl FnMut(FrameRef<'_>)) -> anyhow::Result<()> {
    loop {
        while let [b'\n' | b'\r', rest @ ..] = data {
            data = rest;
        }
        if data.is_empty() {
            return Ok(());
        }
        let end = data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| anyhow!("a frame without its NUL"))?;
        let frame = &data[..end];
        data = &data[end + 1..];
        let command_end = frame
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(frame.len());
        let command = frame[..command_end]
            .strip_suffix(b"\r")
            .unwrap_or(&frame[..command_end]);
        let after_command = &frame[(command_end + 1).min(frame.len())..];
        let (head, body) = match find(after_command, b"\n\n") {
            Some(i) => (&after_command[..i], &after_command[i + 2..]),
            None => match find(after_command, b"\r\n\r\n") {
                Some(i) => (&after_command[..i], &after_command[i + 4..]),
                None => (after_command, &[][..]),
            },
        };
        each(FrameRef {
            command,
            head,
            body,
        });
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A frame as a text WebSocket message (the benchmark's frames are UTF-8).
pub fn frame(command: &str, headers: &[(&str, &str)], body: &str) -> Message {
    let mut text = String::with_capacity(command.len() + body.len() + 64);
    text.push_str(command);
    text.push('\n');
    for (name, value) in headers {
        text.push_str(name);
        text.push(':');
        text.push_str(value);
        text.push('\n');
    }
    text.push('\n');
    text.push_str(body);
    text.push('\0');
    Message::text(text)
}

/// The bytes of a text or binary message; None for control messages.
pub fn payload(message: &Message) -> Option<&[u8]> {
    match message {
        Message::Text(text) => Some(text.as_bytes()),
        Message::Binary(data) => Some(data),
        _ => None,
    }
}

/// Opens the WebSocket (offering STOMP 1.2), sends CONNECT without
/// heart-beats and waits for CONNECTED.
pub async fn connect(endpoint: &Endpoint) -> anyhow::Result<Ws> {
    let mut request = endpoint.url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "v12.stomp".parse()?);
    let (mut ws, _) =
        tokio::time::timeout(endpoint.timeout, tokio_tungstenite::connect_async(request))
            .await
            .context("WebSocket handshake timed out")?
            .context("WebSocket handshake")?;
    let mut headers = vec![
        ("accept-version", "1.2"),
        ("host", "/"),
        ("heart-beat", "0,0"),
    ];
    if let Some(login) = &endpoint.login {
        headers.push(("login", login));
    }
    if let Some(passcode) = &endpoint.passcode {
        headers.push(("passcode", passcode));
    }
    ws.send(frame("CONNECT", &headers, "")).await?;
    expect(&mut ws, b"CONNECTED", endpoint.timeout).await?;
    Ok(ws)
}

/// SUBSCRIBE (ack auto) with a receipt, and waits for the RECEIPT: once it
/// is back, the binding exists and nothing published after is missed.
pub async fn subscribe(ws: &mut Ws, destination: &str, wait: Duration) -> anyhow::Result<()> {
    let headers = [
        ("id", "0"),
        ("destination", destination),
        ("ack", "auto"),
        ("receipt", "subscribed"),
    ];
    ws.send(frame("SUBSCRIBE", &headers, "")).await?;
    expect(ws, b"RECEIPT", wait).await
}

/// Reads until a frame with `command`; an ERROR or a close is an error.
async fn expect(ws: &mut Ws, command: &[u8], wait: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("no {} within {wait:?}", String::from_utf8_lossy(command)))?
            .ok_or_else(|| anyhow!("connection closed"))??;
        let Some(data) = payload(&message) else {
            if let Message::Close(close) = message {
                bail!("connection closed: {close:?}");
            }
            continue;
        };
        let mut found = Ok(false);
        scan(data, |f| {
            if f.command == command {
                found = Ok(true);
            } else if f.command == b"ERROR" {
                let why = f.header("message").unwrap_or(b"");
                found = Err(anyhow!(
                    "ERROR {}: {}",
                    String::from_utf8_lossy(why),
                    String::from_utf8_lossy(f.body)
                ));
            }
        })?;
        if found? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_several_frames_and_heartbeats() {
        let data = b"\nMESSAGE\nsubscription:0\ndestination:/topic/a\n\nhello\0\r\nRECEIPT\r\nreceipt-id:7\r\n\r\n\0";
        let mut seen = Vec::new();
        scan(data, |f| {
            seen.push((
                f.command.to_vec(),
                f.header("receipt-id").map(<[u8]>::to_vec),
                f.body.to_vec(),
            ))
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (b"MESSAGE".to_vec(), None, b"hello".to_vec()),
                (b"RECEIPT".to_vec(), Some(b"7".to_vec()), Vec::new()),
            ]
        );
    }

    #[test]
    fn a_frame_without_nul_is_an_error() {
        assert!(scan(b"MESSAGE\n\nbody", |_| {}).is_err());
    }
}
