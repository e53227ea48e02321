//! Hostile clients over real WebSockets: each is answered within its limit
//! (ERROR naming it, then close), refusals are counted by limit, and the
//! gateway keeps serving everyone else with bounded memory.

mod common;

use std::time::{Duration, Instant};

use common::{body_text, reader_and_writer, refusals, unique, Client, Closed, Gateway};
use futures_util::StreamExt;
use stompgate::stomp::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

async fn assert_served(gw: &Gateway) {
    let dest = format!("/topic/{}", unique("ok"));
    let (mut reader, mut writer) = reader_and_writer(gw, &dest, "auto").await;
    writer.send_confirmed(&dest, "served").await;
    assert_eq!(body_text(&reader.recv_message().await), "served");
    reader.disconnect().await;
    writer.disconnect().await;
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
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
        .wait_no_queues(&gw.queue_prefix(), Duration::from_secs(5))
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
