//! Shared by the end-to-end tests: a gateway started in-process on
//! 127.0.0.1:0 against the real RabbitMQ, a WebSocket STOMP client, and the
//! RabbitMQ management API. Every wait is bounded and fails with a message.

#![allow(dead_code)] // each test binary uses its own part of this module

pub mod proxy;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use stompgate::broker::amqp::AmqpBroker;
use stompgate::config::Config;
use stompgate::metrics::Metrics;
use stompgate::server;
use stompgate::stomp::frame::{encode, Decoder, Frame, Limits};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const MGMT: &str = "http://127.0.0.1:15672/api";

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A name no other test (or earlier run) uses: for routing keys, node ids.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}x{:04x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u16>()
    )
}

/// The test process's resident memory in KiB (in-process gateways run
/// in it).
pub fn resident_kib() -> u64 {
    status_kib("self", "VmRSS:")
}

/// A field in KiB of `/proc/<process>/status` (VmRSS:, VmHWM:).
fn status_kib(process: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .unwrap_or_else(|e| panic!("/proc/{process}/status: {e}"))
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{process}/status"))
}

/// An AMQP content header written by hand, as a publisher that does not
/// check UTF-8 sends it (RabbitMQ passes it on): a header named `good`
/// with value `v`, one whose name is not UTF-8, and a message-id that is
/// not UTF-8.
pub fn content_header_with_bad_strings(body_size: u64) -> Vec<u8> {
    let mut table = Vec::new();
    for name in [&b"good"[..], b"bad\xff"] {
        table.push(name.len() as u8);
        table.extend_from_slice(name);
        table.extend_from_slice(b"S\0\0\0\x01v");
    }
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&body_size.to_be_bytes());
    // Property flags: headers, message-id.
    p.extend_from_slice(&((1u16 << 13) | (1 << 7)).to_be_bytes());
    p.extend_from_slice(&(table.len() as u32).to_be_bytes());
    p.extend_from_slice(&table);
    p.extend_from_slice(b"\x02\xc3\x28");
    p
}

/// `/readyz`'s status and body (0 when it does not answer).
pub async fn readyz(gw: &Gateway) -> (u16, String) {
    match reqwest::get(gw.http_url("/readyz")).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Polls until `/readyz` answers `status` with a body containing `says`;
/// returns the body.
pub async fn wait_readyz_saying(gw: &Gateway, status: u16, says: &str, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (now, body) = readyz(gw).await;
        if now == status && body.contains(says) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not answer {status} saying {says:?} within {within:?}; last: {now} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `/readyz` answers `status`.
pub async fn wait_readyz(gw: &Gateway, status: u16, within: Duration) {
    wait_readyz_saying(gw, status, "", within).await;
}

/// Fails the test with a clear message when RabbitMQ is not there.
pub async fn require_rabbitmq() {
    for (port, what) in [(5672, "AMQP"), (15672, "management API")] {
        if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            panic!(
                "RabbitMQ {what} is not reachable on 127.0.0.1:{port}. These tests need a real \
                 RabbitMQ with the management plugin: run scripts/test (it starts one), or \
                 `rabbitmq-server -detached && rabbitmq-plugins enable rabbitmq_management`."
            );
        }
    }
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub config: Arc<Config>,
    shutdown: CancellationToken,
    /// None for a gateway running as another process.
    handle: Option<JoinHandle<()>>,
}

impl Gateway {
    pub async fn start() -> Gateway {
        Gateway::start_with(|_| {}).await
    }

    /// Starts a gateway with the defaults, a unique node id and whatever
    /// `adjust` changes.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Gateway {
        Gateway::start_wrapped(adjust, |broker| broker).await
    }

    /// Like [`Gateway::start_with`], with the broker port behind `wrap`
    /// (a test's own [`Broker`] around the real one, to inject faults).
    pub async fn start_wrapped<B: stompgate::broker::Broker>(
        adjust: impl FnOnce(&mut Config),
        wrap: impl FnOnce(AmqpBroker) -> B,
    ) -> Gateway {
        require_rabbitmq().await;
        let mut config = Config::defaults().expect("default config is valid");
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.node_id = unique("t");
        config.amqp.url = AMQP_URL.to_owned();
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new().expect("metrics registry"));
        let broker = wrap(
            AmqpBroker::new(&config.amqp, &config.server.node_id, metrics.clone())
                .expect("broker pool"),
        );
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server::run(
            listener,
            config.clone(),
            broker,
            metrics,
            shutdown.clone(),
        ));
        Gateway {
            addr,
            config,
            shutdown,
            handle: Some(handle),
        }
    }

    /// A gateway started elsewhere (the binary), known by address and config.
    pub fn external(addr: SocketAddr, config: Arc<Config>) -> Gateway {
        Gateway {
            addr,
            config,
            shutdown: CancellationToken::new(),
            handle: None,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Queue names of this gateway start with this.
    pub fn queue_prefix(&self) -> String {
        format!("stompgate.{}.", self.config.server.node_id)
    }

    pub fn queue_of(&self, session: &str) -> String {
        format!("{}{session}", self.queue_prefix())
    }

    /// Begins shutdown (SIGTERM's effect) without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits for the server task, bounded.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let Some(handle) = self.handle else { return };
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("gateway did not stop within 30 s")
            .expect("gateway task panicked");
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the client saw instead of a frame.
#[derive(Debug)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The stream ended without a close frame.
    Dropped,
}

/// A STOMP client over a real WebSocket, using the crate's own codec for
/// convenience; tests/codec.rs checks that codec on its own, and other
/// tests pin exact bytes where they matter.
pub struct Client {
    pub ws: Ws,
    decoder: Decoder,
    pub subprotocol: Option<String>,
    /// Text or binary, for each frame received (in order).
    pub kinds: Vec<&'static str>,
    pub heartbeats: usize,
}

impl Client {
    /// Opens the WebSocket only, offering `v12.stomp`.
    pub async fn open(gw: &Gateway) -> Client {
        Client::open_with(gw, Some("v12.stomp, v11.stomp, v10.stomp"), None).await
    }

    pub async fn open_with(gw: &Gateway, protocols: Option<&str>, origin: Option<&str>) -> Client {
        let mut headers = Vec::new();
        if let Some(p) = protocols {
            headers.push(("sec-websocket-protocol", p));
        }
        if let Some(o) = origin {
            headers.push(("origin", o));
        }
        Client::open_url(&gw.ws_url(), &headers).await
    }

    /// Opens a WebSocket to `url` with extra request headers.
    pub async fn open_url(url: &str, headers: &[(&'static str, &str)]) -> Client {
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("WebSocket handshake timed out")
            .expect("WebSocket handshake failed");
        let subprotocol = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        Client {
            ws,
            decoder: Decoder::new(Limits {
                max_frame_bytes: 64 << 20,
                max_headers: 1000,
                max_header_bytes: 1 << 20,
            }),
            subprotocol,
            kinds: Vec::new(),
            heartbeats: 0,
        }
    }

    /// Opens and sends CONNECT (STOMP 1.2, no heart-beats); returns the
    /// client and the session id from CONNECTED.
    pub async fn connect(gw: &Gateway) -> (Client, String) {
        let mut client = Client::open(gw).await;
        let session = client
            .handshake(
                Frame::new("CONNECT")
                    .header("accept-version", "1.2")
                    .header("host", "/"),
            )
            .await;
        (client, session)
    }

    pub async fn handshake(&mut self, connect: Frame) -> String {
        self.send_frame(&connect).await;
        let connected = self.recv().await;
        assert_eq!(connected.command, "CONNECTED", "{connected:?}");
        connected.get("session").expect("session header").to_owned()
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        self.send_raw(&encode(frame, true)).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let message = match std::str::from_utf8(bytes) {
            Ok(text) => Message::text(text),
            Err(_) => Message::binary(Bytes::copy_from_slice(bytes)),
        };
        self.ws.send(message).await.expect("WebSocket send");
    }

    /// The next frame, or why none came: the connection closed.
    pub async fn next(&mut self, wait: Duration) -> Result<Frame, Closed> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(frame) = self.decoder.next_frame().expect("server frame decodes") {
                return Ok(frame);
            }
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no frame from the gateway within {wait:?}"));
            match message {
                Some(Ok(Message::Text(text))) => {
                    if text.as_str() == "\n" || text.as_str() == "\r\n" {
                        self.heartbeats += 1;
                    } else {
                        self.kinds.push("text");
                    }
                    self.decoder.feed(text.as_bytes());
                }
                Some(Ok(Message::Binary(data))) => {
                    self.kinds.push("binary");
                    self.decoder.feed(&data);
                }
                Some(Ok(Message::Close(close))) => {
                    // Answer the close at once, as browsers do; tungstenite
                    // queues the reply but sends it only on the next I/O,
                    // which left the gateway waiting out its close grace.
                    let _ = self.ws.flush().await;
                    return Err(Closed::Code(close.map_or(1005, |c| u16::from(c.code))));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(Closed::Dropped),
            }
        }
    }

    /// Reads until `n` heart-beats have arrived in all; fails on a frame.
    pub async fn wait_heartbeats(&mut self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.heartbeats < n {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("{} of {n} heart-beats within {within:?}", self.heartbeats)
                });
            match message {
                Some(Ok(Message::Text(text))) if text.as_str() == "\n" => self.heartbeats += 1,
                other => panic!("expected a heart-beat, got {other:?}"),
            }
        }
    }

    /// The next frame; fails the test when the connection closes instead.
    pub async fn recv(&mut self) -> Frame {
        match self.next(WAIT).await {
            Ok(frame) => frame,
            Err(closed) => panic!("connection closed ({closed:?}) while a frame was expected"),
        }
    }

    /// The next MESSAGE; fails on anything else.
    pub async fn recv_message(&mut self) -> Frame {
        let frame = self.recv().await;
        assert_eq!(frame.command, "MESSAGE", "expected MESSAGE, got {frame:?}");
        frame
    }

    /// Expects an ERROR frame and then the close; returns the ERROR.
    pub async fn expect_error(&mut self) -> Frame {
        let frame = self.recv().await;
        assert_eq!(frame.command, "ERROR", "expected ERROR, got {frame:?}");
        self.expect_closed().await;
        frame
    }

    /// Expects the connection to close with no further frame.
    pub async fn expect_closed(&mut self) -> Closed {
        match self.next(WAIT).await {
            Ok(frame) => panic!("expected the connection to close, got {frame:?}"),
            Err(closed) => closed,
        }
    }

    /// SUBSCRIBE and wait for its RECEIPT, so the binding exists.
    pub async fn subscribe(&mut self, id: &str, destination: &str) {
        self.subscribe_with(id, destination, "auto").await;
    }

    pub async fn subscribe_with(&mut self, id: &str, destination: &str, ack: &str) {
        let receipt = format!("sub-{id}");
        self.send_frame(
            &Frame::new("SUBSCRIBE")
                .header("id", id)
                .header("destination", destination)
                .header("ack", ack)
                .header("receipt", receipt.as_str()),
        )
        .await;
        self.expect_receipt(&receipt).await;
    }

    pub async fn unsubscribe(&mut self, id: &str) {
        let receipt = format!("unsub-{id}");
        self.send_frame(
            &Frame::new("UNSUBSCRIBE")
                .header("id", id)
                .header("receipt", receipt.as_str()),
        )
        .await;
        self.expect_receipt(&receipt).await;
    }

    pub async fn expect_receipt(&mut self, id: &str) -> Frame {
        let frame = self.recv().await;
        assert_eq!(
            frame.command, "RECEIPT",
            "expected RECEIPT {id}, got {frame:?}"
        );
        assert_eq!(frame.get("receipt-id"), Some(id));
        frame
    }

    /// SEND without a receipt.
    pub async fn send(&mut self, destination: &str, body: &str) {
        self.send_frame(
            &Frame::new("SEND")
                .header("destination", destination)
                .body(Bytes::copy_from_slice(body.as_bytes())),
        )
        .await;
    }

    /// SEND with a fresh receipt id, which it returns.
    async fn send_with_receipt(&mut self, destination: &str, body: &str) -> String {
        let receipt = unique("r");
        self.send_frame(
            &Frame::new("SEND")
                .header("destination", destination)
                .header("receipt", receipt.as_str())
                .body(Bytes::copy_from_slice(body.as_bytes())),
        )
        .await;
        receipt
    }

    /// SEND with a receipt; returns the RECEIPT (after the broker's confirm).
    pub async fn send_confirmed(&mut self, destination: &str, body: &str) -> Frame {
        let receipt = self.send_with_receipt(destination, body).await;
        self.expect_receipt(&receipt).await
    }

    /// SEND with a receipt to a destination this client reads: returns the
    /// RECEIPT and the MESSAGE, which STOMP does not order (RabbitMQ sends
    /// the delivery and the confirm independently).
    pub async fn send_to_self(&mut self, destination: &str, body: &str) -> (Frame, Frame) {
        let receipt = self.send_with_receipt(destination, body).await;
        let (first, second) = (self.recv().await, self.recv().await);
        let (receipt_frame, message) = if first.command == "RECEIPT" {
            (first, second)
        } else {
            (second, first)
        };
        assert_eq!(receipt_frame.command, "RECEIPT", "{receipt_frame:?}");
        assert_eq!(receipt_frame.get("receipt-id"), Some(receipt.as_str()));
        assert_eq!(message.command, "MESSAGE", "{message:?}");
        (receipt_frame, message)
    }

    /// DISCONNECT with a receipt, then the close.
    pub async fn disconnect(mut self) {
        self.send_frame(&Frame::new("DISCONNECT").header("receipt", "bye"))
            .await;
        self.expect_receipt("bye").await;
        self.expect_closed().await;
    }
}

/// The commonest cast: a reader subscribed (id "s") to `destination` with
/// `ack` mode, and a writer, both connected.
pub async fn reader_and_writer(gw: &Gateway, destination: &str, ack: &str) -> (Client, Client) {
    let (mut reader, _) = Client::connect(gw).await;
    reader.subscribe_with("s", destination, ack).await;
    let (writer, _) = Client::connect(gw).await;
    (reader, writer)
}

/// `/metrics` as `name{labels}` → value.
pub async fn scrape(gw: &Gateway) -> std::collections::HashMap<String, f64> {
    let text = reqwest::get(gw.http_url("/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// `GET /admin/sessions` with `token`, as JSON.
pub async fn admin_sessions(gw: &Gateway, token: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(gw.http_url("/admin/sessions"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET /admin/sessions")
        .json()
        .await
        .expect("/admin/sessions answers JSON")
}

/// Polls /metrics until `name` reads `want` (gauges settle as sessions
/// end: a session's connection slot is free once it is off
/// `stompgate_connections_open`).
pub async fn settle(gw: &Gateway, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = scrape(gw).await.get(name).copied().unwrap_or(0.0);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `stompgate_refusals_total` for one limit (0 when never counted).
pub async fn refusals(gw: &Gateway, limit: &str) -> f64 {
    let name = format!("stompgate_refusals_total{{limit=\"{limit}\"}}");
    scrape(gw).await.get(&name).copied().unwrap_or(0.0)
}

pub fn body_text(frame: &Frame) -> &str {
    std::str::from_utf8(&frame.body).expect("UTF-8 body")
}

/// The RabbitMQ management API (guest/guest).
pub struct Management {
    http: reqwest::Client,
}

impl Management {
    pub fn new() -> Management {
        Management {
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }

    pub async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = self
            .http
            .get(format!("{MGMT}{path}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API reachable");
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(
            response.status().is_success(),
            "management API {path}: {}",
            response.status()
        );
        Some(response.json().await.expect("management API JSON"))
    }

    /// The sessions' queues among [`Management::queues`]: not the one
    /// each node's presence agent holds for as long as the node runs.
    pub async fn session_queues(&self, prefix: &str) -> Vec<String> {
        let mut queues = self.queues(prefix).await;
        queues.retain(|name| !name.contains(".presence-"));
        queues
    }

    /// Names of the queues whose name starts with `prefix`.
    pub async fn queues(&self, prefix: &str) -> Vec<String> {
        let queues = self
            .get("/queues/%2f?columns=name")
            .await
            .expect("queue list");
        queues
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|q| q["name"].as_str())
            .filter(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    pub async fn queue(&self, name: &str) -> Option<serde_json::Value> {
        self.get(&format!("/queues/%2f/{name}")).await
    }

    /// (exchange, routing key) of the queue's bindings, leaving out the
    /// default exchange's implicit one; sorted.
    pub async fn bindings(&self, queue: &str) -> Vec<(String, String)> {
        let list = self
            .get(&format!("/queues/%2f/{queue}/bindings"))
            .await
            .unwrap_or_default();
        let mut bindings: Vec<(String, String)> = list
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|b| b["source"] != "")
            .map(|b| {
                (
                    b["source"].as_str().unwrap().to_owned(),
                    b["routing_key"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        bindings.sort();
        bindings
    }

    /// Polls the AMQP connection named `name` until `ready` accepts it. The
    /// API lists connections from statistics that lag by seconds, so a
    /// connection may be missing at first; that counts as not ready.
    pub async fn wait_connection(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let connections = self
                .get("/connections?columns=client_properties,channels,name")
                .await
                .expect("connection list");
            let found = connections
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["client_properties"]["connection_name"] == name)
                .cloned();
            match found {
                Some(c) if ready(&c) => return c,
                last => assert!(
                    tokio::time::Instant::now() < deadline,
                    "AMQP connection {name:?}: not {what} within {within:?} (last seen: {last:?})"
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls until no queue starts with `prefix`, failing after `within`:
    /// for a node that has gone.
    pub async fn wait_no_queues(&self, prefix: &str, within: Duration) {
        self.wait_none(prefix, within, false).await
    }

    /// Polls until no session's queue starts with `prefix` (a running
    /// node's presence queue stays), failing after `within`.
    pub async fn wait_no_session_queues(&self, prefix: &str, within: Duration) {
        self.wait_none(prefix, within, true).await
    }

    async fn wait_none(&self, prefix: &str, within: Duration, sessions_only: bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = match sessions_only {
                true => self.session_queues(prefix).await,
                false => self.queues(prefix).await,
            };
            if left.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "queues still present after {within:?}: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The stompgate binary as a real process (smoke and fault tests).
pub struct Node {
    pub child: std::process::Child,
    pub gateway: Gateway,
    /// Its log lines after the "listening" one, kept for tests to read.
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Runs a client program (node, python3) to its end, bounded by 60 s,
/// and returns its standard output; fails with its output if it failed.
pub async fn run_client<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    program: &str,
    args: &[S],
) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not exit within 60 s"))
    .unwrap_or_else(|e| panic!("cannot run {program}: {e} (scripts/test installs it)"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// `stompgate` with a clean environment plus `envs`, output piped.
///
/// `STOMPGATE_BIN=PATH` runs another build instead (an older one, to
/// measure an attack's cost before a change with the same test).
pub fn stompgate_command(envs: &[(&str, &str)], args: &[&str]) -> std::process::Command {
    let binary = std::env::var("STOMPGATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_stompgate").to_owned());
    let mut command = std::process::Command::new(binary);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

impl Node {
    /// Starts the binary on 127.0.0.1:0 with a unique node id (plus
    /// `envs`), and waits for its "listening" log line.
    pub fn spawn(envs: &[(&str, &str)]) -> Node {
        Node::spawn_with_args(envs, &[])
    }

    /// [`Node::spawn`] with command-line arguments (`--config PATH`).
    pub fn spawn_with_args(envs: &[(&str, &str)], args: &[&str]) -> Node {
        let node_id = unique("n");
        let mut all = vec![
            ("STOMPGATE__SERVER__LISTEN", "127.0.0.1:0"),
            ("STOMPGATE__SERVER__NODE_ID", node_id.as_str()),
            ("STOMPGATE__AMQP__URL", AMQP_URL),
        ];
        all.extend_from_slice(envs);
        let mut child = stompgate_command(&all, args)
            .spawn()
            .expect("run the stompgate binary");
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let addr = wait_listening(&mut child, logs.clone());
        let mut config = Config::defaults().unwrap();
        config.server.node_id = node_id;
        Node {
            child,
            gateway: Gateway::external(addr, Arc::new(config)),
            logs,
        }
    }

    /// Log lines so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(line) = self.log_lines(needle).into_iter().next() {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process's resident memory now and its peak so far, in KiB
    /// (VmRSS and VmHWM).
    pub fn memory_kib(&self) -> (u64, u64) {
        let pid = self.child.id().to_string();
        (status_kib(&pid, "VmRSS:"), status_kib(&pid, "VmHWM:"))
    }

    /// CPU time the process has used so far (user and system).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the gateway process is running");
        // Fields after the command name, which is in parentheses.
        let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
        let fields: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        // USER_HZ is 100 on Linux.
        Duration::from_millis((fields[0] + fields[1]) * 10)
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("stompgate did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's output, line by line, read on a thread of its own so that
/// a test can wait for a line with `recv_timeout`.
pub fn output_lines(
    output: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads the log until the "listening" line; returns the bound address.
/// The rest of the log keeps being read into `logs` (the first 10 000
/// lines) so the pipe never fills and blocks the gateway.
fn wait_listening(
    child: &mut std::process::Child,
    logs: Arc<std::sync::Mutex<Vec<String>>>,
) -> SocketAddr {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if !sent {
                if let Some(rest) = line.split("listening on ws://").nth(1) {
                    let addr = rest.split("/ws").next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
            let mut logs = logs.lock().unwrap();
            if logs.len() < 10_000 {
                logs.push(line);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no 'listening on ws://…' log line within 20 s");
    addr.parse().expect("bound address in the log line")
}

/// Runs openssl (keys and certificates for the JWT and TLS tests).
pub fn openssl(args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (scripts/test installs it): {e}"));
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A consumer without acks of a queue of its own (exclusive, gone with the
/// connection) bound to amq.topic with `key`: an AMQP reader of `/topic/<key>`.
pub async fn amqp_consumer(channel: &lapin::Channel, key: &str) -> lapin::Consumer {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    channel
        .queue_bind(
            queue.name().clone(),
            "amq.topic".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.bind");
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("basic.consume")
}

/// A direct AMQP connection, as "any AMQP client" in the interop tests.
pub async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    require_rabbitmq().await;
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("AMQP connection");
    let channel = connection.create_channel().await.expect("AMQP channel");
    (connection, channel)
}
