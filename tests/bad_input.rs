//! Bad input gets an ERROR (then close) or a close, never a hang or a
//! crash, and the gateway goes on serving everyone else.

mod common;

use std::time::Duration;

use common::{body_text, reader_and_writer, unique, Client, Closed, Gateway};
use stompgate::stomp::frame::Frame;

/// A fresh client can still connect, subscribe and get a message.
async fn assert_still_serving(gw: &Gateway) {
    let key = unique("alive");
    let (mut reader, mut writer) = reader_and_writer(gw, &format!("/topic/{key}"), "auto").await;
    let receipt = writer
        .send_confirmed(&format!("/topic/{key}"), "still here")
        .await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&reader.recv_message().await), "still here");
    reader.disconnect().await;
    writer.disconnect().await;
}

/// Opens a connection, sends `bytes` (after CONNECT when `connect`), and
/// returns the ERROR the gateway answers with.
async fn error_for(gw: &Gateway, connect: bool, bytes: &[u8]) -> Frame {
    let mut client = if connect {
        Client::connect(gw).await.0
    } else {
        Client::open(gw).await
    };
    client.send_raw(bytes).await;
    client.expect_error().await
}

#[tokio::test]
async fn garbage_bytes() {
    let gw = Gateway::start().await;
    let error = error_for(&gw, false, b"\x00\x01\xff\xfe garbage \x07\n\n\0").await;
    assert_eq!(error.get("message"), Some("malformed frame"));
    let error = error_for(&gw, true, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0").await;
    assert_eq!(error.get("message"), Some("unknown command"));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_command() {
    let gw = Gateway::start().await;
    let error = error_for(
        &gw,
        true,
        b"PUBLISH\ndestination:/topic/x\nreceipt:r9\n\n\0",
    )
    .await;
    assert_eq!(error.get("message"), Some("unknown command"));
    assert_eq!(error.get("receipt-id"), Some("r9"));
    assert!(body_text(&error).contains("PUBLISH"));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn send_before_connect() {
    let gw = Gateway::start().await;
    let error = error_for(&gw, false, b"SEND\ndestination:/topic/x\n\nhi\0").await;
    assert_eq!(error.get("message"), Some("protocol error"));
    assert!(body_text(&error).contains("before CONNECT"));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn subscribe_without_id() {
    let gw = Gateway::start().await;
    let error = error_for(
        &gw,
        true,
        b"SUBSCRIBE\ndestination:/topic/x\nreceipt:s1\n\n\0",
    )
    .await;
    assert_eq!(error.get("message"), Some("missing header"));
    assert_eq!(error.get("receipt-id"), Some("s1"));
    assert!(body_text(&error).contains("\"id\""));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn wildcard_in_send_key() {
    let gw = Gateway::start().await;
    for dest in ["/topic/no01.*", "/pub/#"] {
        let frame = format!("SEND\ndestination:{dest}\n\nx\0");
        let error = error_for(&gw, true, frame.as_bytes()).await;
        assert_eq!(error.get("message"), Some("invalid destination"));
        assert!(body_text(&error).contains("wildcards"));
    }
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn bad_destinations() {
    let gw = Gateway::start().await;
    let long = format!(
        "SUBSCRIBE\nid:1\ndestination:/topic/{}\n\n\0",
        "k".repeat(300)
    );
    let error = error_for(&gw, true, long.as_bytes()).await;
    assert!(body_text(&error).contains("255 bytes"), "{error:?}");
    let error = error_for(&gw, true, b"SUBSCRIBE\nid:1\ndestination:/queue/x\n\n\0").await;
    assert!(body_text(&error).contains("unsupported destination"));
    let error = error_for(&gw, true, b"SUBSCRIBE\nid:1\ndestination:/pub/no01\n\n\0").await;
    assert!(body_text(&error).contains("/pub/ is for SEND"));
    // An exchange not in amqp.allowed_exchanges: refused by the gateway.
    let frame = format!(
        "SEND\ndestination:/exchange/{}/k\nreceipt:e\n\nx\0",
        unique("nope")
    );
    let error = error_for(&gw, true, frame.as_bytes()).await;
    assert_eq!(error.get("message"), Some("access refused"));
    assert!(
        body_text(&error).contains("amqp.allowed_exchanges"),
        "{error:?}"
    );
    let frame = b"SUBSCRIBE\nid:1\ndestination:/exchange/amq.headers/k\n\n\0";
    let error = error_for(&gw, true, frame).await;
    assert_eq!(error.get("message"), Some("access refused"));
    assert_still_serving(&gw).await;
    gw.stop().await;

    // Allowed, but missing in RabbitMQ: the broker refuses, the client is told.
    let gw = Gateway::start_with(|c| c.amqp.allowed_exchanges = vec!["*".to_owned()]).await;
    let frame = format!(
        "SEND\ndestination:/exchange/{}/k\nreceipt:e\n\nx\0",
        unique("nope")
    );
    let error = error_for(&gw, true, frame.as_bytes()).await;
    assert_eq!(error.get("message"), Some("broker error"));
    assert!(body_text(&error).contains("NOT_FOUND"), "{error:?}");
    // Even "*" does not open the direct exchange: whoever could use it
    // would read others' inboxes, or say who reads what (presence).
    for frame in [
        "SEND\ndestination:/exchange/stompgate.direct/presence.beat\n\nx\0",
        "SUBSCRIBE\nid:1\ndestination:/exchange/stompgate.direct/user.ann.inbox\n\n\0",
    ] {
        let error = error_for(&gw, true, frame.as_bytes()).await;
        assert_eq!(error.get("message"), Some("access refused"));
        assert!(
            body_text(&error).contains("amqp.direct_exchange"),
            "{error:?}"
        );
    }
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn undefined_escape() {
    let gw = Gateway::start().await;
    let error = error_for(&gw, true, b"SEND\ndestination:/topic/x\nx-h:a\\tb\n\n\0").await;
    assert_eq!(error.get("message"), Some("undefined escape sequence"));
    assert!(body_text(&error).contains("\\t"));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_frame_names_the_limit() {
    let gw = Gateway::start_with(|c| c.stomp.max_frame_bytes = 64 * 1024).await;
    let mut frame = b"SEND\ndestination:/topic/x\n\n".to_vec();
    frame.extend(std::iter::repeat_n(b'x', 70 * 1024));
    frame.push(0);
    let error = error_for(&gw, true, &frame).await;
    assert_eq!(error.get("message"), Some("frame too large"));
    assert!(body_text(&error).contains("stomp.max_frame_bytes (65536 bytes)"));
    // The same limit when the frame arrives in small pieces.
    let (mut client, _) = Client::connect(&gw).await;
    client.send_raw(b"SEND\ndestination:/topic/x\n\n").await;
    // Eight 8 KiB pieces make the frame cross 64 KiB, before any NUL.
    for _ in 0..8 {
        client.send_raw(&[b'y'; 8 * 1024]).await;
    }
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("frame too large"));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_websocket_message() {
    let gw = Gateway::start_with(|c| c.server.max_message_bytes = 32 * 1024).await;
    let (mut client, _) = Client::connect(&gw).await;
    let mut frame = b"SEND\ndestination:/topic/x\n\n".to_vec();
    frame.extend(std::iter::repeat_n(b'x', 40 * 1024));
    frame.push(0);
    client.send_raw(&frame).await;
    let error = client.recv().await;
    assert_eq!(error.get("message"), Some("frame too large"));
    assert!(body_text(&error).contains("server.max_message_bytes"));
    assert!(matches!(client.expect_closed().await, Closed::Code(1009)));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn connect_that_never_comes() {
    let gw = Gateway::start_with(|c| c.stomp.connect_timeout = Duration::from_millis(300)).await;
    // Silent, and one that dribbles bytes of a CONNECT that never ends.
    let mut silent = Client::open(&gw).await;
    let mut dribbler = Client::open(&gw).await;
    dribbler.send_raw(b"CONN").await;
    for client in [&mut silent, &mut dribbler] {
        let error = client.expect_error().await;
        assert_eq!(error.get("message"), Some("connect timeout"));
        assert!(body_text(&error).contains("stomp.connect_timeout"));
    }
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn no_common_version() {
    let gw = Gateway::start().await;
    let error = error_for(&gw, false, b"CONNECT\naccept-version:2.0,3.1\nhost:/\n\n\0").await;
    assert_eq!(error.get("message"), Some("protocol error"));
    assert_eq!(error.get("version"), Some("1.2,1.1,1.0"));
    assert!(body_text(&error).contains("no common STOMP version"));
    assert_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn origin_not_allowed_is_refused_with_403() {
    let gw = Gateway::start_with(|c| {
        c.server.allowed_origins = vec!["https://news.example".to_owned()];
    })
    .await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(gw.ws_url())
            .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected HTTP 403, got {other:?}"),
    }
    // The allowed origin, and a client sending none (not a browser), get in.
    let mut allowed = Client::open_with(&gw, Some("v12.stomp"), Some("https://news.example")).await;
    allowed
        .handshake(Frame::new("CONNECT").header("accept-version", "1.2"))
        .await;
    allowed.disconnect().await;
    assert_still_serving(&gw).await;
    gw.stop().await;
}

/// stomp.py offers no subprotocol: accepted, STOMP version from CONNECT.
/// A client offering only v10/v11 gets the highest of those.
#[tokio::test]
async fn subprotocol_negotiation() {
    let gw = Gateway::start().await;
    let mut plain = Client::open_with(&gw, None, None).await;
    assert_eq!(plain.subprotocol, None);
    plain
        .send_frame(&Frame::new("CONNECT").header("accept-version", "1.1"))
        .await;
    assert_eq!(plain.recv().await.get("version"), Some("1.1"));
    plain.disconnect().await;

    let mut old = Client::open_with(&gw, Some("v10.stomp, v11.stomp"), None).await;
    assert_eq!(old.subprotocol.as_deref(), Some("v11.stomp"));
    // No accept-version: STOMP 1.0 rules (SUBSCRIBE without id is fine).
    let mut legacy = Client::open_with(&gw, Some("v10.stomp"), None).await;
    legacy.send_frame(&Frame::new("CONNECT")).await;
    assert_eq!(legacy.recv().await.get("version"), Some("1.0"));
    let key = unique("v10");
    legacy
        .send_frame(
            &Frame::new("SUBSCRIBE")
                .header("destination", format!("/topic/{key}"))
                .header("receipt", "r"),
        )
        .await;
    legacy.expect_receipt("r").await;
    old.send_frame(&Frame::new("CONNECT").header("accept-version", "1.1"))
        .await;
    old.recv().await;
    old.send(&format!("/topic/{key}"), "for 1.0").await;
    let message = legacy.recv_message().await;
    assert_eq!(
        message.get("subscription"),
        Some(format!("/topic/{key}").as_str())
    );
    old.disconnect().await;
    legacy.disconnect().await;
    gw.stop().await;
}
