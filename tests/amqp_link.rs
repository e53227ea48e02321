//! The gateway's own AMQP client against the real RabbitMQ: heart-beats
//! on an idle connection, bodies larger than an AMQP frame, and publisher
//! confirms that tell routed from returned publishes one by one.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
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
    mgmt.wait_no_queues(&gw.queue_prefix(), WAIT).await;
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
        match stompgate::broker::client::Connection::open(&url, "stompgate login test").await {
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
    let readyz = reqwest::get(gw.http_url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503);
    gw.stop().await;
}
