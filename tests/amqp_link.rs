//! The gateway's own AMQP client against the real RabbitMQ: heart-beats
//! on an idle connection, bodies larger than an AMQP frame, and publisher
//! confirms that tell routed from returned publishes one by one.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use stompgate::broker::amqp::client::{Connection, Options};
use stompgate::stomp::frame::Frame;

#[tokio::test]
async fn heart_beats_keep_an_idle_broker_connection_open() {
    // RabbitMQ closes a connection that misses two intervals of
    // heart-beats, so the client must send its own while the gateway idles.
    let gw = Gateway::start_with(|c| c.amqp.url = format!("{AMQP_URL}?heartbeat=1")).await;
    let mgmt = Management::new();
    let (mut client, _) = Client::connect(&gw).await;
    let dest = format!("/topic/{}", unique("hb"));
    client.subscribe("s", &dest).await;
    let name = format!("stompgate {}", gw.config.server.node_id);
    let connection = mgmt.wait_connection(&name, WAIT, "listed", |_| true).await;
    let details = mgmt
        .get(&format!(
            "/connections/{}",
            connection["name"]
                .as_str()
                .unwrap()
                .replace(' ', "%20")
                .replace('>', "%3E")
        ))
        .await
        .expect("the connection's details");
    assert_eq!(details["timeout"], 1, "negotiated heart-beat: {details}");

    // The idling itself is what is tested: four intervals without traffic.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let (receipt, message) = client.send_to_self(&dest, "still here").await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&message), "still here");
    let metrics = scrape(&gw).await;
    assert_eq!(
        metrics["stompgate_broker_connections_opened_total"], 1.0,
        "the broker connection was lost and reopened while idle"
    );
    client.disconnect().await;
    mgmt.wait_no_session_queues(&gw.queue_prefix(), WAIT).await;
    gw.stop().await;
}

/// A body of several AMQP frames (RabbitMQ's frame_max is 128 KiB) is
/// split on publish and put back together on delivery, byte for byte.
#[tokio::test]
async fn a_body_larger_than_an_amqp_frame_arrives_whole() {
    let gw = Gateway::start().await;
    let (mut client, _) = Client::connect(&gw).await;
    let dest = format!("/topic/{}", unique("big"));
    client.subscribe("s", &dest).await;
    // 1 MiB of text that is different in every frame-sized piece.
    let body: String = (0..1_048_576u32)
        .map(|i| char::from(b'a' + ((i / 7 + i / 131_072) % 26) as u8))
        .collect();
    let (receipt, message) = client.send_to_self(&dest, &body).await;
    assert_eq!(message.body.len(), body.len());
    assert!(
        message.body == body.as_bytes(),
        "the body came back changed"
    );
    assert_eq!(receipt.get("routed"), Some("true"));
    client.disconnect().await;
    gw.stop().await;
}

/// Routed and unroutable SENDs, interleaved and unconfirmed in between:
/// every receipt says whether its own message was routed. The broker
/// returns an unroutable message before its confirm but not necessarily
/// before other publishes' confirms, so this fails if a return is matched
/// to the wrong publish.
#[tokio::test]
async fn interleaved_routed_and_unroutable_sends_each_get_their_own_answer() {
    let gw = Gateway::start().await;
    let read = format!("/topic/{}", unique("read"));
    let nobody = format!("/topic/{}", unique("nobody"));
    let (mut reader, mut writer) = reader_and_writer(&gw, &read, "auto").await;
    let mut expected = HashMap::new();
    for i in 0..200 {
        let routed = i % 3 != 1;
        let receipt = format!("r{i}");
        let destination = if routed { &read } else { &nobody };
        writer
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", destination.as_str())
                    .header("receipt", receipt.as_str())
                    .body(Bytes::from(format!("m{i}"))),
            )
            .await;
        expected.insert(receipt, routed);
    }
    while !expected.is_empty() {
        let frame = writer.recv().await;
        assert_eq!(frame.command, "RECEIPT", "{frame:?}");
        let id = frame.get("receipt-id").unwrap().to_owned();
        let routed = expected
            .remove(&id)
            .unwrap_or_else(|| panic!("receipt {id} unknown or repeated"));
        assert_eq!(
            frame.get("routed"),
            Some(routed.to_string().as_str()),
            "receipt {id}"
        );
    }
    for i in (0..200).filter(|i| i % 3 != 1) {
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), format!("m{i}"));
    }
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Headers too large for one AMQP frame get the sender an ERROR; they
/// are never sent, as the broker would close the connection that every
/// other session on it shares.
#[tokio::test]
async fn headers_larger_than_an_amqp_frame_are_refused_alone() {
    let gw = Gateway::start_with(|c| {
        c.stomp.max_header_bytes = 1 << 20;
        c.stomp.max_frame_bytes = 2 << 20;
    })
    .await;
    let dest = format!("/topic/{}", unique("hdr"));
    let (mut bystander, _) = Client::connect(&gw).await;
    bystander.subscribe("s", &dest).await;
    let (mut sender, _) = Client::connect(&gw).await;
    let huge = "h".repeat(200 * 1024);
    sender
        .send_frame(
            &Frame::new("SEND")
                .header("destination", dest.as_str())
                .header("x-huge", huge.as_str())
                .body(Bytes::from_static(b"never")),
        )
        .await;
    let error = sender.expect_error().await;
    assert!(
        body_text(&error).contains("do not fit in one AMQP frame"),
        "{error:?}"
    );

    // The shared AMQP connection lived on.
    let (receipt, message) = bystander.send_to_self(&dest, "still served").await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&message), "still served");
    let metrics = scrape(&gw).await;
    assert_eq!(metrics["stompgate_broker_connections_opened_total"], 1.0);
    bystander.disconnect().await;
    gw.stop().await;
}

/// The broker's refusal during the handshake (wrong password, unknown
/// virtual host) comes back with RabbitMQ's reason, and the gateway is
/// not ready while it lasts.
#[tokio::test]
async fn a_refused_login_says_why() {
    require_rabbitmq().await;
    let refused = |url: String| async move {
        let options = Options::new("stompgate login test");
        match Connection::open(&url, &options).await {
            Ok(_) => panic!("{url}: the broker let us in"),
            Err(e) => e.to_string(),
        }
    };
    let wrong_password = refused(AMQP_URL.replace("guest:guest", "guest:wrong")).await;
    assert!(
        wrong_password.contains("ACCESS_REFUSED"),
        "{wrong_password}"
    );
    let no_vhost = refused(AMQP_URL.replace("%2f", &unique("novhost"))).await;
    assert!(no_vhost.contains("NOT_ALLOWED"), "{no_vhost}");

    let gw = Gateway::start_with(|c| {
        c.amqp.url = AMQP_URL.replace("guest:guest", "guest:wrong");
    })
    .await;
    let body = common::wait_readyz_saying(&gw, 503, "ACCESS_REFUSED", WAIT).await;
    assert!(!body.contains("wrong"), "no password in it: {body}");
    gw.stop().await;
}

/// Publishes one message to RabbitMQ over a raw AMQP connection, with a
/// content header written by hand: what a client that does not check
/// UTF-8 sends, and RabbitMQ passes on as it came.
async fn raw_publish(routing_key: &str, content_header: &[u8], body: &[u8]) {
    use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
    use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
    use amq_protocol::types::{FieldTable, LongString};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(frame: &AMQPFrame) -> Vec<u8> {
        gen_frame(frame)(WriteContext::from(Vec::new()))
            .unwrap()
            .into_inner()
            .0
    }
    fn method(channel: u16, method: AMQPClass) -> Vec<u8> {
        frame(&AMQPFrame::Method(channel, method))
    }
    fn raw(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&channel.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes.push(0xCE);
        bytes
    }
    /// Reads until a method frame arrives; returns it.
    async fn read_method(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> AMQPClass {
        loop {
            if buf.len() >= 7 {
                let size = u32::from_be_bytes(buf[3..7].try_into().unwrap()) as usize;
                if buf.len() >= 8 + size {
                    let frame: Vec<u8> = buf.drain(..8 + size).collect();
                    if frame[0] == 1 {
                        let payload = &frame[7..7 + size];
                        return amq_protocol::protocol::parse_class(payload).unwrap().1;
                    }
                    continue;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("RabbitMQ answers")
                .unwrap();
            assert!(n > 0, "RabbitMQ closed the raw connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    let mut stream = tokio::net::TcpStream::connect("127.0.0.1:5672")
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    read_method(&mut stream, &mut buf).await; // start
    let start_ok = connection::StartOk {
        client_properties: FieldTable::default(),
        mechanism: "PLAIN".into(),
        response: LongString::from(&b"\0guest\0guest"[..]),
        locale: "en_US".into(),
    };
    stream
        .write_all(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
        ))
        .await
        .unwrap();
    let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) =
        read_method(&mut stream, &mut buf).await
    else {
        panic!("RabbitMQ tunes the connection");
    };
    let tune_ok = connection::TuneOk {
        channel_max: tune.channel_max,
        frame_max: tune.frame_max,
        heartbeat: 0,
    };
    let open = connection::Open {
        virtual_host: "/".into(),
    };
    let mut out = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
    );
    out.extend(method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(open)),
    ));
    out.extend(method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    ));
    stream.write_all(&out).await.unwrap();
    read_method(&mut stream, &mut buf).await; // open-ok
    read_method(&mut stream, &mut buf).await; // channel open-ok
    let publish = basic::Publish {
        exchange: "amq.topic".into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    };
    let mut out = method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(publish)));
    out.extend(raw(2, 1, content_header));
    out.extend(raw(3, 1, body));
    let close = connection::Close {
        reply_code: 200,
        reply_text: "done".into(),
        class_id: 0,
        method_id: 0,
    };
    out.extend(method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(close)),
    ));
    stream.write_all(&out).await.unwrap();
    // close-ok: RabbitMQ handled the publish before it.
    loop {
        if let AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) =
            read_method(&mut stream, &mut buf).await
        {
            break;
        }
    }
}

/// A message whose header name and message-id are not UTF-8 (RabbitMQ
/// takes it): delivered without them, counted, and the AMQP connection
/// that every session on the node shares is not reset by it.
#[tokio::test]
async fn a_message_with_strings_that_are_not_utf8_is_delivered() {
    let gw = Gateway::start().await;
    let key = unique("odd");
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &format!("/topic/{key}")).await;
    let (mut bystander, _) = Client::connect(&gw).await;
    let bystander_dest = format!("/topic/{}", unique("by"));
    bystander.subscribe("b", &bystander_dest).await;
    let before = scrape(&gw).await;
    for _ in 0..3 {
        raw_publish(&key, &content_header_with_bad_strings(5), b"hello").await;
    }
    for _ in 0..3 {
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), "hello");
        assert_eq!(message.get("good"), Some("v"));
        assert!(message.get("amqp-message-id").is_none(), "{message:?}");
    }
    let after = scrape(&gw).await;
    let grew = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
    assert_eq!(grew("stompgate_broker_lenient_deliveries_total"), 3.0);
    assert_eq!(
        grew("stompgate_broker_connections_opened_total"),
        0.0,
        "no reset"
    );
    bystander.send_to_self(&bystander_dest, "still here").await;
    reader.disconnect().await;
    bystander.disconnect().await;
    gw.stop().await;
}

/// A queue that refuses messages (`x-overflow: reject-publish`, full)
/// makes RabbitMQ nack the publish: the sender gets a RECEIPT saying so,
/// not an ERROR, and its session goes on.
#[tokio::test]
async fn a_nacked_send_gets_a_receipt_and_the_session_goes_on() {
    let gw = Gateway::start().await;
    let key = unique("nack");
    let (_connection, channel) = amqp_channel().await;
    let queue = unique("full");
    let mut arguments = lapin::types::FieldTable::default();
    arguments.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            "amq.topic".into(),
            key.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let (mut client, _) = Client::connect(&gw).await;
    let receipt = client
        .send_confirmed(&format!("/topic/{key}"), "refused")
        .await;
    assert_eq!(receipt.get("stompgate-nacked"), Some("true"), "{receipt:?}");
    assert_eq!(receipt.get("routed"), Some("false"));
    let mine = format!("/topic/{}", unique("mine"));
    client.subscribe("s", &mine).await;
    client.send_to_self(&mine, "and the session goes on").await;
    assert_eq!(
        scrape(&gw).await.get("stompgate_messages_nacked_total"),
        Some(&1.0)
    );
    client.disconnect().await;
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    gw.stop().await;
}

/// A broker that allows fewer channels per connection than
/// amqp.sessions_per_connection: the gateway opens more connections
/// instead of refusing sessions with "no free channel".
#[tokio::test]
async fn a_low_channel_max_opens_more_connections() {
    let gw = Gateway::start_with(|c| c.amqp.url = format!("{AMQP_URL}?channel_max=2")).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let (mut client, _) = Client::connect(&gw).await;
        let dest = format!("/topic/{}", unique(&format!("cm{i}")));
        client.subscribe("s", &dest).await;
        client.send_to_self(&dest, "served").await;
        clients.push(client);
    }
    let opened = scrape(&gw).await["stompgate_broker_connections_opened_total"];
    assert!(
        opened >= 3.0,
        "5 sessions at 2 channels each: {opened} connections"
    );
    for client in clients {
        client.disconnect().await;
    }
    gw.stop().await;
}

/// Every way a broker connection fails is logged: the URL without its
/// password, and the reason an operator can act on. Repeats are
/// rate-limited (one line per 10 s, saying how many were left out).
#[tokio::test]
async fn failed_broker_connections_are_logged_with_the_reason() {
    require_rabbitmq().await;
    let cases = [
        (
            AMQP_URL.replace("guest:guest", "guest:s3cret"),
            "ACCESS_REFUSED",
        ),
        (AMQP_URL.replace("%2f", &unique("novhost")), "NOT_ALLOWED"),
        ("amqp://guest:s3cret@127.0.0.1:1/%2f".to_owned(), "refused"),
        ("amqps://guest:s3cret@127.0.0.1:5672/%2f".to_owned(), "TLS"),
    ];
    for (i, (url, reason)) in cases.into_iter().enumerate() {
        let node = Node::spawn(&[("STOMPGATE__AMQP__URL", url.as_str())]);
        let line = node.wait_log("could not connect to the broker", WAIT);
        assert!(line.contains(reason), "{url}: {line}");
        assert!(line.contains("127.0.0.1"), "names the broker: {line}");
        assert!(!line.contains("s3cret"), "no password in logs: {line}");
        if i == 0 {
            // The probe tries again every 5 s; the log does not repeat it.
            let gw = &node.gateway;
            wait_metric_at_least(gw, "stompgate_broker_connect_failures_total", 2.0).await;
            assert_eq!(node.log_lines("could not connect").len(), 1);
        }
    }
}

/// Polls `/metrics` until `name` reaches `least`.
async fn wait_metric_at_least(gw: &Gateway, name: &str, least: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = scrape(gw).await.get(name).copied().unwrap_or(0.0);
        if got >= least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got}, expected {least}+"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
