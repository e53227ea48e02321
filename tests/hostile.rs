//! Hostile clients over real WebSockets: each is answered within its limit
//! (ERROR naming it, then close), refusals are counted by limit, and the
//! gateway keeps serving everyone else with bounded memory.

mod common;

use std::time::{Duration, Instant};

use common::{
    body_text, reader_and_writer, refusals, resident_kib, unique, Client, Closed, Gateway, Node,
};
use futures_util::StreamExt;
use stompgate::stomp::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::Message;

async fn assert_served(gw: &Gateway) {
    let dest = format!("/topic/{}", unique("ok"));
    let (mut reader, mut writer) = reader_and_writer(gw, &dest, "auto").await;
    writer.send_confirmed(&dest, "served").await;
    assert_eq!(body_text(&reader.recv_message().await), "served");
    reader.disconnect().await;
    writer.disconnect().await;
}

/// Slow-loris after CONNECT: a frame trickling in a byte at a time is cut
/// off at stomp.frame_timeout.
#[tokio::test]
async fn a_frame_that_never_ends() {
    let gw = Gateway::start_with(|c| c.stomp.frame_timeout = Duration::from_millis(800)).await;
    let (mut client, _) = Client::connect(&gw).await;
    client.send_raw(b"SEND\ndestination:/topic/x\n\n").await;
    let error = loop {
        client.send_raw(b"a").await;
        if let Ok(Ok(frame)) =
            tokio::time::timeout(Duration::from_millis(100), client.next(common::WAIT)).await
        {
            break frame;
        }
    };
    assert_eq!(error.get("message"), Some("frame timeout"));
    assert!(body_text(&error).contains("stomp.frame_timeout"));
    assert_eq!(refusals(&gw, "stomp.frame_timeout").await, 1.0);
    assert_served(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn ten_thousand_subscriptions() {
    let gw = Gateway::start().await;
    let key = unique("many");
    let (mut client, _) = Client::connect(&gw).await;
    let frames: String = (0..10_000)
        .map(|i| format!("SUBSCRIBE\nid:{i}\ndestination:/topic/{key}.{i}\n\n\0"))
        .collect();
    client.send_raw(frames.as_bytes()).await;
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("limit exceeded"));
    assert!(body_text(&error).contains("stomp.max_subscriptions (256)"));
    assert_eq!(refusals(&gw, "stomp.max_subscriptions").await, 1.0);
    common::Management::new()
        .wait_no_session_queues(&gw.queue_prefix(), Duration::from_secs(5))
        .await;
    assert_served(&gw).await;
    gw.stop().await;
}

/// A flood of SENDs is slowed to stomp.publish_rate by not reading the
/// client; the gateway does not buffer it, and others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sends_is_throttled_not_buffered() {
    let gw = Gateway::start_with(|c| {
        c.stomp.publish_rate = 1000;
        c.stomp.publish_burst = 100;
    })
    .await;
    let (mut flooder, _) = Client::connect(&gw).await;
    let dest = format!("/topic/{}", unique("flood"));
    let before = resident_kib();
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let body = "f".repeat(16 * 1024);
        for _ in 0..2000 {
            flooder.send(&dest, &body).await; // 2000 × 16 KiB = 31 MiB
        }
        let receipt = flooder.send_confirmed(&dest, "last").await;
        assert_eq!(receipt.get("routed"), Some("false"));
        flooder
    });
    // Others are served while the flood goes on.
    assert_served(&gw).await;
    let flooder = tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("flood finished")
        .unwrap();
    let took = started.elapsed();
    // 2000 SENDs beyond a burst of 100 at 1000/s cannot take less than 1.9 s.
    assert!(
        took >= Duration::from_millis(1800),
        "throttle let 2000 SENDs through in {took:?}"
    );
    let grown = resident_kib().saturating_sub(before);
    assert!(
        grown < 24 * 1024,
        "memory grew by {grown} KiB during a 31 MiB flood"
    );
    println!("flood of 2000 × 16 KiB: {took:?}, resident memory grew {grown} KiB");
    flooder.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_headers() {
    let gw = Gateway::start().await;
    let (mut client, _) = Client::connect(&gw).await;
    client
        .send_raw(b"SEND\ndestination:/topic/x\nx-bad:\xc3\x28\xff\n\nbody\0")
        .await;
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("malformed frame"));
    assert!(body_text(&error).contains("UTF-8"));
    assert_served(&gw).await;
    gw.stop().await;
}

/// A header value with a line break (sent escaped) comes out escaped: it
/// cannot inject a header or end the frame early on the way out.
#[tokio::test]
async fn header_injection_is_escaped_on_the_way_out() {
    let gw = Gateway::start().await;
    let key = unique("inject");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    writer
        .send_raw(
            format!(
                "SEND\ndestination:/topic/{key}\nx-note:hi\\nsubscription:evil\\n\\ninjected\nreceipt:r\n\nbody\0"
            )
            .as_bytes(),
        )
        .await;
    writer.expect_receipt("r").await;
    let raw = loop {
        match reader.ws.next().await {
            Some(Ok(Message::Text(text))) if text.starts_with("MESSAGE") => break text,
            Some(Ok(_)) => continue,
            other => panic!("expected a MESSAGE, got {other:?}"),
        }
    };
    assert!(
        raw.contains("\nx-note:hi\\nsubscription\\cevil\\n\\ninjected\n"),
        "{raw}"
    );
    assert_eq!(raw.matches("\nsubscription:").count(), 1, "{raw}");
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Connections per client address and per node are bounded; a refused one
/// gets an ERROR naming the limit and close 1013, and a freed slot is
/// usable again. A client opening connections in a loop changes nothing
/// for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_and_a_connection_loop() {
    let gw = Gateway::start_with(|c| c.server.max_connections_per_ip = 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(Client::connect(&gw).await.0);
    }
    let mut refused = Client::open(&gw).await;
    let error = refused.recv().await;
    assert_eq!(error.get("message"), Some("too many connections"));
    assert!(body_text(&error).contains("server.max_connections_per_ip (5)"));
    assert!(matches!(refused.expect_closed().await, Closed::Code(1013)));
    assert_eq!(refusals(&gw, "server.max_connections_per_ip").await, 1.0);
    held.pop().unwrap().disconnect().await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    // The slot frees as the session ends, just after its close.
    loop {
        let mut client = Client::open(&gw).await;
        client
            .send_frame(&Frame::new("CONNECT").header("accept-version", "1.2"))
            .await;
        let frame = client.recv().await;
        if frame.command == "CONNECTED" {
            held.push(client);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
    }
    for client in held {
        client.disconnect().await;
    }
    // Their slots are free once their sessions have cleaned up.
    common::settle(&gw, "stompgate_connections_open", 0.0).await;

    // A loop of 300 connect/close; the gateway serves others throughout.
    for _ in 0..300 {
        let mut client = Client::open(&gw).await;
        client.ws.close(None).await.unwrap();
        client.expect_closed().await;
    }
    assert_served(&gw).await;
    gw.stop().await;

    let gw = Gateway::start_with(|c| c.server.max_connections = 2).await;
    let (a, _) = Client::connect(&gw).await;
    let (b, _) = Client::connect(&gw).await;
    let mut refused = Client::open(&gw).await;
    let error = refused.recv().await;
    assert!(body_text(&error).contains("server.max_connections (2)"));
    a.disconnect().await;
    b.disconnect().await;
    gw.stop().await;
}

/// The remaining per-frame and per-transaction limits, each answered with
/// an ERROR naming its config key and counted under it.
#[tokio::test]
async fn header_and_transaction_limits() {
    let gw = Gateway::start_with(|c| {
        c.stomp.max_headers = 8;
        c.stomp.max_header_bytes = 256;
        c.stomp.max_transactions = 2;
        c.stomp.max_transaction_bytes = 1024;
    })
    .await;
    let many_headers: String = (0..9).map(|i| format!("h{i}:v\n")).collect();
    let long_header = format!("x:{}\n", "v".repeat(300));
    let cases: [(String, &str, &str); 4] = [
        (
            format!("SEND\ndestination:/topic/x\n{many_headers}\n\0"),
            "too many headers",
            "stomp.max_headers",
        ),
        (
            format!("SEND\ndestination:/topic/x\n{long_header}\n\0"),
            "header too long",
            "stomp.max_header_bytes",
        ),
        (
            "BEGIN\ntransaction:a\n\n\0BEGIN\ntransaction:b\n\n\0BEGIN\ntransaction:c\n\n\0".into(),
            "limit exceeded",
            "stomp.max_transactions",
        ),
        (
            format!(
                "BEGIN\ntransaction:t\n\n\0SEND\ndestination:/topic/x\ntransaction:t\n\n{}\0",
                "b".repeat(2000)
            ),
            "limit exceeded",
            "stomp.max_transaction_bytes",
        ),
    ];
    for (frames, message, key) in cases {
        let (mut client, _) = Client::connect(&gw).await;
        client.send_raw(frames.as_bytes()).await;
        let error = client.expect_error().await;
        assert_eq!(error.get("message"), Some(message), "{key}");
        assert!(body_text(&error).contains(key), "{key}: {error:?}");
        assert_eq!(refusals(&gw, key).await, 1.0, "{key}");
    }
    assert_served(&gw).await;
    gw.stop().await;
}

/// A raw NUL in a SEND header would end the MESSAGE a subscriber reads,
/// and what follows it would read as a frame of the sender's making (a
/// forged ERROR or RECEIPT). The SEND is refused; nothing reaches the
/// subscriber.
#[tokio::test]
async fn a_nul_in_a_header_is_refused() {
    let gw = Gateway::start().await;
    let dest = format!("/topic/{}", unique("nul"));
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;
    writer
        .send_raw(
            format!("SEND\ndestination:{dest}\naaa:x\0ERROR\nmessage:forged\n\nbody\0").as_bytes(),
        )
        .await;
    let error = writer.expect_error().await;
    assert_eq!(error.get("message"), Some("malformed frame"));
    assert!(body_text(&error).contains("NUL"), "{}", body_text(&error));
    let (mut sender, _) = Client::connect(&gw).await;
    sender.send_confirmed(&dest, "next").await;
    let message = reader.recv_message().await;
    assert_eq!(body_text(&message), "next", "the forged SEND never arrived");
    reader.disconnect().await;
    sender.disconnect().await;
    gw.stop().await;
}

/// Headers only a server sets (`stompgate-*`, `receipt-id`, `message-id`,
/// `subscription`, `user-id`) are dropped from a SEND: subscribers never
/// see a client's forgery of them.
#[tokio::test]
async fn a_client_cannot_set_the_servers_headers() {
    let gw = Gateway::start().await;
    let dest = format!("/topic/{}", unique("forge"));
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", dest.as_str())
                .header("stompgate-gap", "true")
                .header("stompgate-anything", "x")
                .header("receipt-id", "forged")
                .header("user-id", "admin")
                .header("kept", "yes")
                .header("receipt", "r")
                .body(&b"hi"[..]),
        )
        .await;
    writer.expect_receipt("r").await;
    let message = reader.recv_message().await;
    for name in [
        "stompgate-gap",
        "stompgate-anything",
        "receipt-id",
        "user-id",
    ] {
        assert!(
            message.get(name).is_none(),
            "{name} reached the reader: {message:?}"
        );
    }
    assert_eq!(message.get("kept"), Some("yes"));
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// A large header section sent one byte per WebSocket message, without a
/// pause: each byte costs the decoder only itself (it resumes where it
/// stopped), and stomp.frame_timeout fires on time although the read
/// branch never runs dry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_section_trickling_in_is_cut_off_on_time() {
    let timeout = Duration::from_secs(2);
    let gw = Gateway::start_with(|c| {
        c.stomp.frame_timeout = timeout;
        c.stomp.max_headers = 100_000;
        c.stomp.max_header_bytes = 1 << 20;
        c.stomp.max_frame_bytes = 8 << 20;
    })
    .await;
    let (client, _) = Client::connect(&gw).await;
    let (mut sink, mut stream) = client.ws.split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        use futures_util::SinkExt;
        let mut head = b"SEND\ndestination:/topic/x\n".to_vec();
        for i in 0..50_000 {
            head.extend_from_slice(format!("h{i}:v\n").as_bytes());
        }
        for byte in head {
            if sink
                .send(Message::text((byte as char).to_string()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let error = loop {
        match tokio::time::timeout(common::WAIT, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.starts_with("ERROR") => break text,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected the ERROR, got {other:?}"),
        }
    };
    let took = started.elapsed();
    trickle.abort();
    assert!(error.contains("frame timeout"), "{error}");
    assert!(
        took < timeout + Duration::from_secs(2),
        "frame_timeout {timeout:?} fired after {took:?}"
    );
    assert_served(&gw).await;
    gw.stop().await;
}

/// A WebSocket message begun (a fragment without FIN) and never finished
/// counts as a partial frame for stomp.frame_timeout.
#[tokio::test]
async fn an_unfinished_websocket_message_is_cut_off() {
    let gw = Gateway::start_with(|c| c.stomp.frame_timeout = Duration::from_millis(800)).await;
    let (mut client, _) = Client::connect(&gw).await;
    let started = Instant::now();
    send_fragment(
        &mut client,
        vec![b'x'; 64 << 10],
        OpCode::Data(Data::Binary),
        false,
    )
    .await;
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("frame timeout"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_served(&gw).await;
    gw.stop().await;
}

/// One WebSocket frame of a message in fragments (`fin` on the last).
async fn send_fragment(client: &mut Client, data: Vec<u8>, opcode: OpCode, fin: bool) {
    let fragment = WsFrame::message(data, opcode, fin);
    futures_util::SinkExt::send(&mut client.ws, Message::Frame(fragment))
        .await
        .unwrap();
}

/// A frame's stomp.frame_timeout runs from its first byte, also when the
/// WebSocket message carrying it took a while to arrive: finishing the
/// message does not start the frame's clock again. (Before, a client held
/// back mid-message got its frame timeout at twice the setting; CI saw it
/// in `clients_holding_unfinished_frames_are_held_to_a_node_budget`.)
#[tokio::test]
async fn a_frame_finishing_its_websocket_message_keeps_its_clock() {
    let frame_timeout = Duration::from_secs(4);
    let gw = Gateway::start_with(|c| c.stomp.frame_timeout = frame_timeout).await;
    let (mut client, _) = Client::connect(&gw).await;
    let started = Instant::now();
    let begun = b"SEND\ndestination:/topic/x\n\nbegun".to_vec();
    send_fragment(&mut client, begun, OpCode::Data(Data::Binary), false).await;
    // The client is slow, which is what this is about: the message ends
    // most of a frame_timeout later, with the frame still unfinished.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let rest = b" and not ended".to_vec();
    send_fragment(&mut client, rest, OpCode::Data(Data::Continue), true).await;
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("frame timeout"));
    // From the frame's first byte: 4 s (the clock started again would
    // make it 7.5 s).
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "frame timeout after {took:?}"
    );
    gw.stop().await;
}

/// A transaction holds checked SENDs only, counted with their headers: a
/// SEND to a destination it may not use is refused when it comes, not at
/// COMMIT (so nothing of the transaction is published), and headers
/// count toward stomp.max_transaction_bytes as bodies do.
#[tokio::test]
async fn transactions_hold_only_what_could_be_published() {
    let gw = Gateway::start_with(|c| c.stomp.max_transaction_bytes = 16 << 10).await;
    let dest = format!("/topic/{}", unique("tx"));
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;
    writer
        .send_raw(
            format!(
                "BEGIN\ntransaction:t\n\n\0\
                 SEND\ndestination:{dest}\ntransaction:t\n\nallowed\0\
                 SEND\ndestination:/exchange/not.allowed/k\ntransaction:t\nreceipt:bad\n\nno\0\
                 COMMIT\ntransaction:t\n\n\0"
            )
            .as_bytes(),
        )
        .await;
    let error = writer.expect_error().await;
    assert_eq!(error.get("receipt-id"), Some("bad"), "refused at the SEND");
    assert!(body_text(&error).contains("amqp.allowed_exchanges"));
    // The allowed SEND before it was never published.
    let (mut sender, _) = Client::connect(&gw).await;
    sender.send_confirmed(&dest, "after").await;
    assert_eq!(body_text(&reader.recv_message().await), "after");

    // 5 SENDs with 4 KiB of headers and no body: over 16 KiB.
    let (mut client, _) = Client::connect(&gw).await;
    let header = format!("h:{}\n", "v".repeat(4 << 10));
    let send = format!("SEND\ndestination:{dest}\ntransaction:t\n{header}\n\0");
    client
        .send_raw(format!("BEGIN\ntransaction:t\n\n\0{}", send.repeat(5)).as_bytes())
        .await;
    let error = client.expect_error().await;
    assert!(
        body_text(&error).contains("stomp.max_transaction_bytes"),
        "{error:?}"
    );
    reader.disconnect().await;
    sender.disconnect().await;
    gw.stop().await;
}

/// The ERROR before the close arrives even when the client is still
/// sending as the gateway refuses it: an oversized WebSocket message, and
/// an oversized STOMP frame in many messages, 50 times each. The client
/// sends everything before it reads, as a busy client would. The gateway
/// reads and drops what keeps coming until the client closes, instead of
/// dropping a socket with unread bytes, which the kernel answers with a
/// reset that destroys the ERROR the client has not read yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_before_the_close_always_arrives() {
    use futures_util::SinkExt;
    let gw = Gateway::start_with(|c| {
        c.server.max_message_bytes = 64 << 10;
        c.stomp.max_frame_bytes = 32 << 10;
    })
    .await;
    for (case, pieces, piece) in [("message", 1, 4 << 20), ("frame", 64, 16 << 10)] {
        for round in 0..50 {
            let (mut client, _) = Client::connect(&gw).await;
            let mut frame = b"SEND\ndestination:/topic/x\n\n".to_vec();
            frame.resize(piece, b'x');
            for _ in 0..pieces {
                // The gateway may refuse before all is sent: errors here
                // are the point, not a failure.
                if client
                    .ws
                    .feed(Message::binary(frame.clone()))
                    .await
                    .is_err()
                {
                    break;
                }
                frame = vec![b'y'; piece];
            }
            let _ = client.ws.flush().await;
            let got = loop {
                match tokio::time::timeout(common::WAIT, client.ws.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => break Some(text.to_string()),
                    Ok(Some(Ok(Message::Binary(data)))) => {
                        break Some(String::from_utf8_lossy(&data).into_owned())
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_)) | None) => break None,
                    Err(_) => panic!("{case} {round}: nothing within {:?}", common::WAIT),
                }
            };
            let got = got.unwrap_or_else(|| panic!("{case} {round}: closed without the ERROR"));
            assert!(got.starts_with("ERROR"), "{case} {round}: {got}");
            assert!(got.contains("frame too large"), "{case} {round}: {got}");
        }
    }
    assert_served(&gw).await;
    gw.stop().await;
}

/// A broker port that panics on a publish to a routing key ending in
/// `.panic`: a stand-in for any bug a message could trigger.
#[derive(Clone)]
struct PanickingBroker(stompgate::broker::amqp::AmqpBroker);

struct PanickingSession(
    <stompgate::broker::amqp::AmqpBroker as stompgate::broker::Broker>::Session,
);

impl stompgate::broker::Broker for PanickingBroker {
    type Session = PanickingSession;

    async fn open(
        &self,
        session_id: &str,
        acks: bool,
    ) -> Result<PanickingSession, stompgate::broker::BrokerError> {
        self.0.open(session_id, acks).await.map(PanickingSession)
    }

    fn readiness(&self) -> stompgate::broker::Readiness {
        self.0.readiness()
    }

    async fn probe(&self) {
        self.0.probe().await
    }
}

impl stompgate::broker::BrokerSession for PanickingSession {
    type Confirm = <<stompgate::broker::amqp::AmqpBroker as stompgate::broker::Broker>::Session as stompgate::broker::BrokerSession>::Confirm;

    fn queue_name(&self) -> &str {
        self.0.queue_name()
    }
    async fn bind(
        &mut self,
        route: &stompgate::destination::Route,
    ) -> Result<(), stompgate::broker::BrokerError> {
        self.0.bind(route).await
    }
    async fn unbind(
        &mut self,
        route: &stompgate::destination::Route,
    ) -> Result<(), stompgate::broker::BrokerError> {
        self.0.unbind(route).await
    }
    async fn publish(
        &mut self,
        message: &stompgate::broker::Publish,
    ) -> Result<Self::Confirm, stompgate::broker::BrokerError> {
        assert!(
            !message.route.key.ends_with(".panic"),
            "a bug this message triggers"
        );
        self.0.publish(message).await
    }
    async fn next_delivery(
        &mut self,
    ) -> Option<Result<stompgate::broker::Delivery, stompgate::broker::BrokerError>> {
        self.0.next_delivery().await
    }
    fn acks(&self) -> bool {
        self.0.acks()
    }
    fn behind(&self) -> bool {
        self.0.behind()
    }
    async fn require_acks(
        &mut self,
    ) -> Result<Vec<stompgate::broker::Delivery>, stompgate::broker::BrokerError> {
        self.0.require_acks().await
    }
    async fn ack(
        &mut self,
        tag: u64,
        multiple: bool,
    ) -> Result<(), stompgate::broker::BrokerError> {
        self.0.ack(tag, multiple).await
    }
    async fn nack(
        &mut self,
        tag: u64,
        requeue: bool,
    ) -> Result<(), stompgate::broker::BrokerError> {
        self.0.nack(tag, requeue).await
    }
    fn writable(&self) -> bool {
        self.0.writable()
    }
    fn until_writable(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.0.until_writable()
    }
    async fn close(self) {
        self.0.close().await
    }
}

/// A panic in one session ends that session only: its socket closes, its
/// queue goes, it leaves connections_open and /admin/sessions, and every
/// other session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_ends_only_its_own_session() {
    let gw = Gateway::start_wrapped(|c| c.server.admin_token = "t".into(), PanickingBroker).await;
    let mgmt = common::Management::new();
    let dest = format!("/topic/{}", unique("bystander"));
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;
    let (mut doomed, session) = Client::connect(&gw).await;
    let queue = gw.queue_of(&session);
    doomed
        .subscribe("s", &format!("/topic/{}", unique("doomed")))
        .await;
    assert!(mgmt.queue(&queue).await.is_some());
    doomed
        .send(&format!("/topic/{}.panic", unique("x")), "boom")
        .await;
    assert!(
        doomed.next(common::WAIT).await.is_err(),
        "its connection ends"
    );
    common::settle(&gw, "stompgate_connections_open", 2.0).await;
    mgmt.wait_no_queues(&queue, common::WAIT).await;
    let sessions = common::admin_sessions(&gw, "t").await;
    assert!(!sessions.to_string().contains(&session), "{sessions}");
    writer.send_confirmed(&dest, "still here").await;
    assert_eq!(body_text(&reader.recv_message().await), "still here");
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Reads from `stream` until the server closes it; fails if it stays open
/// for `within`. Returns what was read.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection stayed open for {within:?}"),
        }
    }
}

/// A connection that never sends its HTTP request, one that sends it too
/// slowly, and a kept-alive one that goes quiet after a request are all
/// closed after server.header_read_timeout (before, such connections
/// stayed open and uncounted until the node ran out of descriptors).
#[tokio::test]
async fn connections_that_send_no_request_are_closed() {
    use tokio::io::AsyncWriteExt;
    let timeout = Duration::from_millis(500);
    let gw = Gateway::start_with(|c| c.server.header_read_timeout = timeout).await;
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /healthz HT").await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    for stream in [&mut silent, &mut slow] {
        read_until_closed(stream, Duration::from_secs(5)).await;
    }
    let answered = read_until_closed(&mut kept, Duration::from_secs(5)).await;
    assert!(
        String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"),
        "the request in time was served"
    );
    let took = started.elapsed();
    assert!(took < timeout * 4, "closed after {took:?}");
    assert_served(&gw).await;
    gw.stop().await;
}

/// Connections that have not upgraded (yet) count toward
/// server.max_connections_per_ip: with five held open without a request,
/// a WebSocket from the same address is refused with the ERROR naming the
/// limit, `/healthz` still answers, and once they are gone it connects.
#[tokio::test]
async fn connections_not_yet_upgraded_count_toward_the_per_address_limit() {
    let gw = Gateway::start_with(|c| c.server.max_connections_per_ip = 5).await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
    }
    let mut refused = Client::open(&gw).await;
    let error = refused.recv().await;
    assert_eq!(error.get("message"), Some("too many connections"));
    assert!(body_text(&error).contains("server.max_connections_per_ip (5)"));
    assert_eq!(refusals(&gw, "server.max_connections_per_ip").await, 1.0);
    let health = reqwest::get(gw.http_url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    drop(silent);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let mut client = Client::open(&gw).await;
        client
            .send_frame(&Frame::new("CONNECT").header("accept-version", "1.2"))
            .await;
        if client.recv().await.command == "CONNECTED" {
            client.disconnect().await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the places were never given back"
        );
    }
    gw.stop().await;
}

/// One WebSocket message packed with frames that each want a receipt:
/// the session holds at most stomp.max_unconfirmed of them at a time
/// (the rest wait, undecoded, in the message it read), and every receipt
/// still comes, in order.
#[tokio::test]
async fn a_burst_of_receipts_is_answered_in_order_a_few_at_a_time() {
    let gw = Gateway::start_with(|c| c.stomp.max_unconfirmed = 4).await;
    let (mut client, _) = Client::connect(&gw).await;
    let burst: String = (0..200)
        .map(|i| format!("ACK\nid:{}\nreceipt:r{i}\n\n\0", 1_000_000 + i))
        .collect();
    client.send_raw(burst.as_bytes()).await;
    for i in 0..200 {
        let receipt = client.recv().await;
        assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
        assert_eq!(receipt.get("receipt-id"), Some(format!("r{i}").as_str()));
    }
    // The session goes on afterwards.
    let dest = format!("/topic/{}", unique("after-burst"));
    client.subscribe("s", &dest).await;
    client.send_to_self(&dest, "still here").await;
    client.disconnect().await;
    gw.stop().await;
}

/// stomp.publish_bytes_rate holds a client that sends few but large
/// frames: 8 SENDs of 32 KiB at 64 KiB/s (burst 64 KiB) are all
/// published, the last once the debt of the 7 before it is paid, after
/// (7 × 32 KiB − 64 KiB) / 64 KiB/s = 2.5 s: throttled by not reading.
#[tokio::test]
async fn large_sends_are_throttled_by_bytes() {
    let gw = Gateway::start_with(|c| {
        c.stomp.publish_bytes_rate = 64 << 10;
        c.stomp.publish_bytes_burst = 64 << 10;
    })
    .await;
    let dest = format!("/topic/{}", unique("bytes"));
    let (mut client, _) = Client::connect(&gw).await;
    let body = vec![b'b'; 32 << 10];
    let started = Instant::now();
    for i in 0..8 {
        client
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", dest.as_str())
                    .header("receipt", format!("r{i}"))
                    .body(body.clone()),
            )
            .await;
    }
    for i in 0..8 {
        client.expect_receipt(&format!("r{i}")).await;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2400),
        "8 × 32 KiB at 64 KiB/s in {took:?}"
    );
    client.disconnect().await;
    gw.stop().await;
}

/// Samples a spawned gateway's resident memory until `done` resolves;
/// returns what `done` gave and the highest sample in KiB (VmHWM is the
/// process's peak, whatever the sampling missed).
async fn sampling_memory<T>(node: &Node, done: impl std::future::Future<Output = T>) -> (T, u64) {
    tokio::pin!(done);
    let mut highest = 0;
    loop {
        highest = highest.max(node.memory_kib().0);
        tokio::select! {
            out = &mut done => return (out, highest.max(node.memory_kib().1)),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Ten subscribers that never read, and twenty 4 MB messages to their
/// topic (the report: 824 MB peak, 564 MB still held after they closed).
/// A session that stops taking deliveries holds at most
/// amqp.prefetch_bytes of them, and is ended past it (an ERROR naming the
/// limit, or cut off when the node holds too much); the node stays far
/// below 512 MiB, returns near where it started, and serves another
/// client throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_readers_of_large_messages_cannot_fill_the_node() {
    let node = Node::spawn(&[]);
    let gw = &node.gateway;
    assert_served(gw).await;
    let (baseline, _) = node.memory_kib();
    let cpu_before = node.cpu_time();
    let dest = format!("/topic/{}", unique("big"));
    let mut stuck = Vec::new();
    for i in 0..10 {
        let (mut client, _) = Client::connect(gw).await;
        client.subscribe(&format!("s{i}"), &dest).await;
        stuck.push(client);
    }
    let (mut writer, _) = Client::connect(gw).await;
    let started = Instant::now();
    let attack = async {
        let body = "x".repeat(4_000_000);
        for _ in 0..20 {
            writer.send(&dest, &body).await;
        }
        writer.send_confirmed(&dest, "last").await;
        // Others are served while the stuck sessions hold what they hold.
        assert_served(gw).await;
        // Every stuck session is ended (as a slow client, for the bytes
        // it holds or, failing that, for stomp.slow_client_timeout).
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let metrics = common::scrape(gw).await;
            let ended = metrics["stompgate_slow_client_disconnects_total"];
            if ended >= 10.0 {
                break;
            }
            assert!(Instant::now() < deadline, "{ended} stuck sessions ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ((), peak) = sampling_memory(&node, attack).await;
    let took = started.elapsed();
    let cpu = node.cpu_time() - cpu_before;
    println!(
        "10 stuck readers × 20 × 4 MB: baseline {} MiB, peak {} MiB, CPU {cpu:?} in {took:?}",
        baseline / 1024,
        peak / 1024,
    );
    assert!(peak < 512 * 1024, "the node peaked at {} MiB", peak / 1024);
    // Each was ended for the bytes it held: by its own bound (an ERROR
    // it finds when it reads at last) or, past the node's, cut off; one
    // that stayed within its bound (its acked window full, the broker
    // holding the rest) at stomp.slow_client_timeout.
    let by_session = refusals(gw, "amqp.prefetch_bytes").await;
    let by_node = refusals(gw, "amqp.node_prefetch_bytes").await;
    let timed_out = refusals(gw, "stomp.slow_client_timeout").await;
    assert_eq!(by_session + by_node + timed_out, 10.0);
    println!("ended by amqp.prefetch_bytes {by_session}, amqp.node_prefetch_bytes {by_node}, stomp.slow_client_timeout {timed_out}");
    for mut client in stuck {
        loop {
            match client.next(common::WAIT).await {
                Ok(frame) if frame.command == "MESSAGE" => continue,
                Ok(error) => {
                    assert_eq!(error.get("message"), Some("slow consumer"), "{error:?}");
                    assert!(body_text(&error).contains("prefetch_bytes"));
                    break;
                }
                Err(_) => break,
            }
        }
    }
    writer.disconnect().await;
    // Freed memory goes back to the system.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (now, _) = node.memory_kib();
        if now < baseline + 64 * 1024 {
            println!("after the attack: {} MiB", now / 1024);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node still holds {} MiB (it started at {} MiB)",
            now / 1024,
            baseline / 1024
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three subscribers stop reading a channel carrying 500 messages a second
/// (the report: the session never moved to acked consumption, and the
/// gateway grew by 100 MB per stuck client in 30 s). Each moves to acks,
/// so RabbitMQ holds its backlog; the node's memory stays flat, and a
/// reader of the same channel gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_readers_of_a_busy_channel_leave_the_backlog_in_rabbitmq() {
    let node = Node::spawn(&[]);
    let gw = &node.gateway;
    let mgmt = common::Management::new();
    let dest = format!("/topic/{}", unique("busy"));
    let mut stuck = Vec::new();
    let mut queues = Vec::new();
    for i in 0..3 {
        let (mut client, session) = Client::connect(gw).await;
        client.subscribe(&format!("s{i}"), &dest).await;
        queues.push(gw.queue_of(&session));
        stuck.push(client);
    }
    let (mut reader, mut writer) = reader_and_writer(gw, &dest, "auto").await;
    let (baseline, _) = node.memory_kib();
    let cpu_before = node.cpu_time();
    let body = "b".repeat(4000);
    let count = 5000;
    let started = Instant::now();
    // The reader keeps up, and gets every message in order.
    let reading = tokio::spawn(async move {
        for i in 0..count {
            let message = reader.recv_message().await;
            assert_eq!(&message.body[..5], format!("{i:05}").as_bytes());
        }
        reader
    });
    let run = async {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        for i in 0..count {
            tick.tick().await;
            writer.send(&dest, &format!("{i:05}{body}")).await;
        }
        reading.await.expect("the reader got every message")
    };
    let (reader, peak) = sampling_memory(&node, run).await;
    let cpu = node.cpu_time() - cpu_before;
    println!(
        "3 stuck readers at 500 msg/s for {:?}: baseline {} MiB, peak {} MiB, CPU {cpu:?}",
        started.elapsed(),
        baseline / 1024,
        peak / 1024
    );
    // Every stuck session consumes with acks now...
    let metrics = common::scrape(gw).await;
    let moved: f64 = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("stompgate_acked_consumption_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(moved, 3.0, "{metrics:?}");
    // ...so RabbitMQ holds what they did not read.
    for queue in &queues {
        let ready = mgmt.queue(queue).await.expect("queue")["messages_ready"]
            .as_u64()
            .unwrap_or(0);
        assert!(ready > 1000, "{queue} holds only {ready} ready messages");
    }
    assert!(
        peak < baseline + 64 * 1024,
        "the node grew from {} to {} MiB",
        baseline / 1024,
        peak / 1024
    );
    for client in stuck {
        drop(client);
    }
    writer.disconnect().await;
    reader.disconnect().await;
    mgmt.wait_no_session_queues(&gw.queue_prefix(), Duration::from_secs(40))
        .await;
}

/// `stompgate_held_bytes{held=…}` now.
async fn held_bytes(gw: &Gateway, held: &str) -> f64 {
    common::scrape(gw).await[&format!(r#"stompgate_held_bytes{{held="{held}"}}"#)]
}

/// Waits until `stompgate_held_bytes{held=…}` satisfies `ok`.
async fn wait_held_bytes(gw: &Gateway, held: &str, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + common::WAIT;
    loop {
        let bytes = held_bytes(gw, held).await;
        if ok(bytes) {
            return;
        }
        assert!(Instant::now() < deadline, "{held} holds {bytes} bytes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stuck subscribers that each stay under amqp.prefetch_bytes but together
/// pass amqp.node_prefetch_bytes: those that hold more than 1 MiB and
/// have not taken a delivery for a second are ended, counted under the
/// node's limit; a reader that keeps up gets every message, and what was
/// held is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_readers_together_are_held_to_a_node_budget() {
    let gw = Gateway::start_with(|c| {
        c.amqp.prefetch_bytes = 64 << 20;
        c.amqp.node_prefetch_bytes = 4 << 20;
    })
    .await;
    let dest = format!("/topic/{}", unique("node"));
    let mut stuck = Vec::new();
    for i in 0..6 {
        let (mut client, _) = Client::connect(&gw).await;
        client.subscribe(&format!("s{i}"), &dest).await;
        stuck.push(client);
    }
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;
    let count = 64;
    let reading = tokio::spawn(async move {
        for i in 0..count {
            let message = reader.recv_message().await;
            assert_eq!(&message.body[..4], format!("{i:04}").as_bytes());
        }
        reader
    });
    let body = "n".repeat(256 << 10);
    for i in 0..count {
        writer.send(&dest, &format!("{i:04}{body}")).await;
    }
    let reader = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the reader got every message in time")
        .unwrap();
    let deadline = Instant::now() + common::WAIT;
    while refusals(&gw, "amqp.node_prefetch_bytes").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no session was ended for amqp.node_prefetch_bytes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Those cut off while their write waited get no ERROR (they would
    // not read it): their connection ends. Once the node was back under
    // its budget, the others were left alone: they get every message.
    for mut client in stuck {
        let mut got = 0;
        while got < count {
            match client.next(common::WAIT).await {
                Ok(frame) if frame.command == "MESSAGE" => got += 1,
                Ok(error) => {
                    assert_eq!(error.get("message"), Some("slow consumer"), "{error:?}");
                    break;
                }
                Err(_) => break,
            }
        }
    }
    wait_held_bytes(&gw, "deliveries", |b| b == 0.0).await;
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Clients each holding part of a large frame: past
/// stomp.node_inbound_bytes a transaction takes no more SENDs and a client
/// holding more than 64 KiB is not read until the node is back under (or
/// its frame times out), while clients sending ordinary frames are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_holding_unfinished_frames_are_held_to_a_node_budget() {
    let gw = Gateway::start_with(|c| {
        c.stomp.node_inbound_bytes = 1 << 20;
        // Long enough for what follows to happen while the node is over.
        c.stomp.frame_timeout = Duration::from_secs(15);
    })
    .await;
    let mut holders = Vec::new();
    for _ in 0..4 {
        let (mut client, _) = Client::connect(&gw).await;
        // 512 KiB of a SEND without its NUL: a frame begun, not ended.
        let mut partial = b"SEND\ndestination:/topic/x\n\n".to_vec();
        partial.resize(512 << 10, b'p');
        client.send_raw(&partial).await;
        holders.push(client);
    }
    wait_held_bytes(&gw, "inbound", |b| b > f64::from(1 << 20)).await;
    assert_served(&gw).await;
    let (mut tx, _) = Client::connect(&gw).await;
    tx.send_raw(b"BEGIN\ntransaction:t\n\n\0SEND\ndestination:/topic/x\ntransaction:t\n\nbody\0")
        .await;
    let error = tx.expect_error().await;
    assert_eq!(error.get("message"), Some("limit exceeded"));
    assert!(body_text(&error).contains("stomp.node_inbound_bytes"));
    assert_eq!(refusals(&gw, "stomp.node_inbound_bytes").await, 1.0);
    // A client that sends a large frame now is not read while the node is
    // over: nothing of it is published...
    let late_dest = format!("/topic/{}", unique("late"));
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &late_dest).await;
    let (mut late, _) = Client::connect(&gw).await;
    let mut frame = format!("SEND\ndestination:{late_dest}\n\n").into_bytes();
    frame.resize(512 << 10, b'l');
    late.send_raw(&frame).await;
    late.send_raw(b"\0").await;
    let early = tokio::time::timeout(Duration::from_secs(2), reader.recv_message()).await;
    assert!(
        early.is_err(),
        "published while the node was over: {early:?}"
    );
    // ...until the others' frames, which never end, are cut off at
    // stomp.frame_timeout and what they held is given back (a client not
    // read does not show that it has gone: its frame_timeout ends it).
    for mut holder in holders {
        let error = holder.next(Duration::from_secs(30)).await.unwrap();
        assert_eq!(error.get("message"), Some("frame timeout"), "{error:?}");
    }
    let message = reader.next(Duration::from_secs(30)).await.unwrap();
    assert_eq!(message.body.len(), frame.len() - late_dest.len() - 19);
    wait_held_bytes(&gw, "inbound", |b| b == 0.0).await;
    late.disconnect().await;
    reader.disconnect().await;
    assert_served(&gw).await;
    gw.stop().await;
}

/// With nobody reading its log any more (the pipe to its stdout and
/// stderr closed, every log write failing), the gateway still stops on
/// SIGTERM and on SIGINT (Ctrl-C): it cancels before it logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_stop_the_gateway_when_its_log_pipe_is_gone() {
    use std::io::BufRead;
    for signal in ["-TERM", "-INT"] {
        let node_id = unique("pipe");
        let mut child = common::stompgate_command(
            &[
                ("STOMPGATE__SERVER__LISTEN", "127.0.0.1:0"),
                ("STOMPGATE__SERVER__NODE_ID", node_id.as_str()),
                ("STOMPGATE__AMQP__URL", common::AMQP_URL),
            ],
            &[],
        )
        .spawn()
        .expect("run the stompgate binary");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("a log line before the log ends")
                .unwrap();
            if let Some(rest) = line.split("listening on ws://").nth(1) {
                break rest.split("/ws").next().unwrap().to_owned();
            }
        };
        // Nobody reads the log from now on.
        drop(lines);
        drop(child.stderr.take());
        // A session that fails logs a line, which now cannot be written.
        let url = format!("ws://{addr}/ws");
        let mut client = Client::open_url(&url, &[]).await;
        client.send_raw(b"BOGUS\n\n\0").await;
        client.expect_error().await;
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kill {signal}: the gateway did not stop with its log pipe gone");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(exited.success(), "kill {signal}: {exited}");
    }
}

/// Runs `attack` against a spawned gateway; prints and returns its peak
/// resident memory (MiB) and the CPU time the gateway spent. The README's
/// table "What one client can cost a node" comes from these lines, run
/// with `STOMPGATE_BIN` set to the build before a change and without.
async fn cost_of(
    node: &Node,
    attack_name: &str,
    attack: impl std::future::Future<Output = ()>,
) -> u64 {
    let (baseline, _) = node.memory_kib();
    let cpu_before = node.cpu_time();
    let ((), peak) = sampling_memory(node, attack).await;
    let cpu = node.cpu_time() - cpu_before;
    println!(
        "cost of {attack_name}: peak {} MiB (baseline {} MiB), CPU {:.1} s",
        peak / 1024,
        baseline / 1024,
        cpu.as_secs_f64()
    );
    peak / 1024
}

/// The report's first finding, scaled: 48 clients at once send CONNECT
/// with a wrong passcode, again and again, for 5 s (each check ~19 MiB of
/// argon2; before, one ran per connection without a bound or a throttle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_at_once_cost_little() {
    let dir = std::env::temp_dir().join(unique("logins"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("users.toml");
    let hash = stompgate::auth::hash_password("the right one").unwrap();
    std::fs::write(
        &config,
        format!(
            "[auth]\nmode = \"users\"\n[[auth.users]]\nname = \"editor\"\n\
             password_hash = \"{hash}\"\nsubscribe = [\"#\"]\npublish = [\"#\"]\n"
        ),
    )
    .unwrap();
    let node = Node::spawn_with_args(&[], &["--config", config.to_str().unwrap()]);
    let url = node.gateway.ws_url();
    let peak = cost_of(&node, "48 clients failing logins for 5 s", async {
        let until = Instant::now() + Duration::from_secs(5);
        let tasks: Vec<_> = (0..48)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let mut client = Client::open_url(&url, &[]).await;
                        client
                            .send_frame(
                                &Frame::new("CONNECT")
                                    .header("accept-version", "1.2")
                                    .header("login", "editor")
                                    .header("passcode", "a wrong one"),
                            )
                            .await;
                        let refused = client.next(Duration::from_secs(60)).await;
                        assert!(
                            matches!(&refused, Ok(frame) if frame.command == "ERROR"),
                            "{refused:?}"
                        );
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    assert!(peak < 512, "the node peaked at {peak} MiB");
    let health = reqwest::get(node.gateway.http_url("/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let _ = std::fs::remove_dir_all(dir);
}

/// The report's second finding, scaled: 4 clients each BEGIN, then send
/// SENDs with 62 headers of 8000 bytes (and no body) that they never
/// commit, reconnecting when refused, until 400 MB have gone on the wire
/// (before, headers did not count toward stomp.max_transaction_bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_of_large_headers_cost_little() {
    let node = Node::spawn(&[]);
    let url = node.gateway.ws_url();
    let peak = cost_of(&node, "transactions of 400 MB of headers", async {
        let value = "h".repeat(8000);
        let headers: String = (0..62).map(|i| format!("h{i}:{value}\n")).collect();
        let send = format!("SEND\ndestination:/topic/x\ntransaction:t\n{headers}\n\0");
        let per_client = 400_000_000 / 4;
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (url, send) = (url.clone(), send.clone());
                tokio::spawn(async move {
                    let mut sent = 0;
                    while sent < per_client {
                        let mut client = Client::open_url(&url, &[]).await;
                        client
                            .send_frame(&Frame::new("CONNECT").header("accept-version", "1.2"))
                            .await;
                        assert_eq!(client.recv().await.command, "CONNECTED");
                        client.send_raw(b"BEGIN\ntransaction:t\n\n\0").await;
                        while sent < per_client {
                            use futures_util::SinkExt;
                            if client.ws.send(Message::text(send.clone())).await.is_err() {
                                break;
                            }
                            sent += send.len();
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
    assert!(peak < 512, "the node peaked at {peak} MiB");
}

/// The report's third finding, scaled: a SEND whose 128 KB header section
/// comes one byte per WebSocket message (before, the decoder parsed the
/// head from its first byte again on every arrival: quadratic, and other
/// clients waited seconds for their messages). Meanwhile another client's
/// SEND reaches its subscriber without delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_section_one_byte_at_a_time_costs_little_cpu() {
    use futures_util::SinkExt;
    let node = Node::spawn(&[]);
    let (mut client, _) = Client::connect(&node.gateway).await;
    let value = "v".repeat(8000);
    let headers: String = (0..16).map(|i| format!("h{i}:{value}\n")).collect();
    let frame = format!("SEND\ndestination:/topic/x\nreceipt:r\n{headers}\n\0");
    let dest = format!("/topic/{}", unique("other"));
    let (mut reader, mut writer) = reader_and_writer(&node.gateway, &dest, "auto").await;
    let trickling = std::sync::atomic::AtomicBool::new(true);
    let cpu_before = node.cpu_time();
    let attack = async {
        for (i, byte) in frame.bytes().enumerate() {
            let text = String::from_utf8(vec![byte]).unwrap();
            client.ws.feed(Message::text(text)).await.unwrap();
            if i % 1024 == 0 {
                client.ws.flush().await.unwrap();
            }
        }
        client.ws.flush().await.unwrap();
        let receipt = client.next(Duration::from_secs(600)).await.unwrap();
        assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
        trickling.store(false, std::sync::atomic::Ordering::Relaxed);
    };
    let others = async {
        let mut slowest = Duration::ZERO;
        while trickling.load(std::sync::atomic::Ordering::Relaxed) {
            let sent = Instant::now();
            writer.send(&dest, "meanwhile").await;
            assert_eq!(body_text(&reader.recv_message().await), "meanwhile");
            slowest = slowest.max(sent.elapsed());
        }
        slowest
    };
    let mut slowest = Duration::ZERO;
    cost_of(
        &node,
        "a 128 KB header section one byte per message",
        async {
            slowest = tokio::join!(attack, others).1;
        },
    )
    .await;
    let cpu = node.cpu_time() - cpu_before;
    println!("another client's SEND → MESSAGE meanwhile: at most {slowest:?}");
    assert!(cpu < Duration::from_secs(30), "the gateway spent {cpu:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "another client waited {slowest:?}"
    );
}

/// The report's sixth finding: 20 clients each begin a WebSocket message
/// of 7 MB (a fragment without FIN) and never finish it; the node is
/// measured while they send (up to 5 s) and for a second after
/// (stomp.frame_timeout ends them later; before, they stayed open past
/// 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_websocket_messages_cost_little() {
    let node = Node::spawn(&[]);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(Client::connect(&node.gateway).await.0);
    }
    let peak = cost_of(&node, "20 unfinished WebSocket messages of 7 MB", async {
        let sends = clients.iter_mut().map(|client| async move {
            let fragment =
                WsFrame::message(vec![b'x'; 7_000_000], OpCode::Data(Data::Binary), false);
            // The node may stop reading: the send may not finish.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                futures_util::SinkExt::send(&mut client.ws, Message::Frame(fragment)),
            )
            .await;
        });
        futures_util::future::join_all(sends).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    // stomp.node_inbound_bytes (64 MiB) counts what arrived; buffers grow
    // by doubling (before: 285 MiB).
    assert!(peak < 200, "the node peaked at {peak} MiB");
}

/// A session with client acks that meets large messages lowers its
/// channel's prefetch so that a window of them fits in half of
/// amqp.prefetch_bytes (RabbitMQ takes the channel-wide `global`
/// prefetch at once): three 3 MB messages, at most one out at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_lower_the_prefetch_of_acked_sessions() {
    let gw = Gateway::start().await;
    let dest = format!("/topic/{}", unique("window"));
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "client-individual").await;
    let body = "w".repeat(3_000_000);
    for _ in 0..3 {
        writer.send(&dest, &body).await;
    }
    for _ in 0..3 {
        let message = reader.recv_message().await;
        assert_eq!(message.body.len(), body.len());
        let ack = message.get("ack").unwrap().to_owned();
        reader
            .send_frame(&Frame::new("ACK").header("id", ack.as_str()))
            .await;
    }
    // Had RabbitMQ refused the channel-wide prefetch, the channel would
    // have failed, and with it the messages out: all three came, and the
    // broker shows the window.
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_channels",
            "global_prefetch_count",
            "consumer_count",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (scripts/test needs it): {e}"));
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "1"]),
        "no consuming channel with a global prefetch of 1:\n{listed}"
    );
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}
