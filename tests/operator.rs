//! What an operator sees in RabbitMQ (through the management HTTP API):
//! one queue per WebSocket connection, named as in the contract, bound by
//! exactly its subscriptions, and gone within 2 s however the connection
//! ends. Plus the health endpoints.

mod common;

use std::time::Duration;

use common::{resident_kib, unique, Client, Gateway, Management};
use stompgate::stomp::frame::Frame;

const GONE_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test]
async fn one_queue_per_connection_bound_by_its_subscriptions() {
    let gw = Gateway::start().await;
    let mgmt = Management::new();
    let key = unique("op");
    let (mut a, session_a) = Client::connect(&gw).await;
    let (mut b, session_b) = Client::connect(&gw).await;
    let queues = mgmt.session_queues(&gw.queue_prefix()).await;
    let mut expected = vec![gw.queue_of(&session_a), gw.queue_of(&session_b)];
    expected.sort();
    let mut queues = queues;
    queues.sort();
    assert_eq!(queues, expected, "exactly one queue per connection");

    let queue = mgmt.queue(&gw.queue_of(&session_a)).await.unwrap();
    assert_eq!(queue["exclusive"], true);
    assert_eq!(queue["auto_delete"], true);
    assert_eq!(queue["durable"], false);

    a.subscribe("1", &format!("/topic/{key}.no01")).await;
    a.subscribe("2", &format!("/sub/{key}.*")).await;
    a.subscribe("3", &format!("/topic/{key}.no01")).await; // shares binding
    a.subscribe("4", "/exchange/amq.direct/direct-key").await;
    b.subscribe("1", &format!("/topic/{key}.no02")).await;
    let topic = |k: &str| ("amq.topic".to_owned(), format!("{key}.{k}"));
    assert_eq!(
        mgmt.bindings(&gw.queue_of(&session_a)).await,
        vec![
            ("amq.direct".to_owned(), "direct-key".to_owned()),
            topic("*"),
            topic("no01"),
        ]
    );
    assert_eq!(
        mgmt.bindings(&gw.queue_of(&session_b)).await,
        vec![topic("no02")]
    );

    // Unsubscribing one of two sharers keeps the binding; the last removes it.
    a.unsubscribe("1").await;
    a.unsubscribe("4").await;
    assert_eq!(
        mgmt.bindings(&gw.queue_of(&session_a)).await,
        vec![topic("*"), topic("no01")]
    );
    a.unsubscribe("3").await;
    assert_eq!(
        mgmt.bindings(&gw.queue_of(&session_a)).await,
        vec![topic("*")]
    );

    // The AMQP connection carries the node's name.
    let name = format!("stompgate {}", gw.config.server.node_id);
    mgmt.wait_connection(&name, Duration::from_secs(20), "listed", |_| true)
        .await;
    a.disconnect().await;
    b.disconnect().await;
    mgmt.wait_no_session_queues(&gw.queue_prefix(), GONE_WITHIN)
        .await;
    gw.stop().await;
}

/// DISCONNECT, ERROR, the client closing, the TCP connection dropping, a
/// heart-beat timeout: each leaves no queue behind, within 2 s.
#[tokio::test]
async fn queue_is_gone_however_the_connection_ends() {
    let gw = Gateway::start().await;
    let mgmt = Management::new();
    let key = unique("end");
    let dest = format!("/topic/{key}");

    async fn subscribed(gw: &Gateway, dest: &str, heart_beat: &str) -> (Client, String) {
        let mut client = Client::open(gw).await;
        let session = client
            .handshake(
                Frame::new("CONNECT")
                    .header("accept-version", "1.2")
                    .header("heart-beat", heart_beat),
            )
            .await;
        client.subscribe("s", dest).await;
        (client, session)
    }
    async fn gone(mgmt: &Management, gw: &Gateway, session: &str, how: &str) {
        let queue = gw.queue_of(session);
        let deadline = tokio::time::Instant::now() + GONE_WITHIN;
        while mgmt.queue(&queue).await.is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue {queue} still there {GONE_WITHIN:?} after {how}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let (client, session) = subscribed(&gw, &dest, "0,0").await;
    assert!(mgmt.queue(&gw.queue_of(&session)).await.is_some());
    client.disconnect().await;
    gone(&mgmt, &gw, &session, "DISCONNECT").await;

    let (mut client, session) = subscribed(&gw, &dest, "0,0").await;
    client.send_raw(b"BOGUS\n\n\0").await;
    client.expect_error().await;
    gone(&mgmt, &gw, &session, "ERROR").await;

    let (mut client, session) = subscribed(&gw, &dest, "0,0").await;
    client.ws.close(None).await.unwrap();
    gone(&mgmt, &gw, &session, "a WebSocket close").await;

    let (client, session) = subscribed(&gw, &dest, "0,0").await;
    drop(client); // TCP connection dropped without a close frame
    gone(&mgmt, &gw, &session, "a dropped connection").await;

    let (mut client, session) = subscribed(&gw, &dest, "250,0").await;
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("heart-beat timeout"));
    gone(&mgmt, &gw, &session, "a heart-beat timeout").await;

    gw.stop().await;
}

/// 1000 connect/subscribe/close cycles: no queue, channel or memory
/// growth left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cycles_leave_nothing_behind() {
    let gw = Gateway::start().await;
    let mgmt = Management::new();
    let key = unique("cycle");
    async fn cycle(gw: &Gateway, dest: &str, i: usize) {
        let (mut client, _) = Client::connect(gw).await;
        client.subscribe("s", dest).await;
        if i.is_multiple_of(2) {
            client.disconnect().await;
        } else {
            client.ws.close(None).await.unwrap();
            client.expect_closed().await;
        }
    }
    let dest = format!("/topic/{key}");
    for i in 0..100 {
        cycle(&gw, &dest, i).await; // warm-up: allocator and pool settle
    }
    let before = resident_kib();
    for i in 0..1000 {
        cycle(&gw, &dest, i).await;
    }
    mgmt.wait_no_session_queues(&gw.queue_prefix(), Duration::from_secs(5))
        .await;
    let grown = resident_kib().saturating_sub(before);
    // A leak of one session's state (queue name, channel, buffers: a few
    // KiB) per cycle would show as several MiB here.
    assert!(
        grown < 4 * 1024,
        "resident memory grew by {grown} KiB over 1000 cycles"
    );

    // Channels: the pool's connection stays open, with the presence
    // agent's channel alone; the management API's channel count lags
    // (statistics interval), so poll it, bounded.
    let name = format!("stompgate {}", gw.config.server.node_id);
    mgmt.wait_connection(
        &name,
        Duration::from_secs(20),
        "with presence's channel alone",
        |c| c["channels"].as_u64() == Some(1),
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = Gateway::start().await;
    let http = reqwest::Client::new();
    let healthz = http.get(gw.http_url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    // Ready once the first connection is open: state, not a live probe.
    common::wait_readyz(&gw, 200, common::WAIT).await;
    gw.stop().await;

    // A broker that is not there: alive, but not ready.
    let gw = Gateway::start_with(|c| {
        c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
        c.amqp.connect_timeout = Duration::from_millis(500);
    })
    .await;
    let healthz = http.get(gw.http_url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    // Not ready, with the reason, once the first attempt failed.
    let body = common::wait_readyz_saying(&gw, 503, "broker unavailable", common::WAIT).await;
    assert!(body.contains("127.0.0.1:1"), "{body}");
    // New WebSocket connections are turned away with the reason, instead
    // of waiting for a broker that is not there.
    let request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(gw.ws_url())
            .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("broker unavailable"), "{body}");
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    gw.stop().await;
}

/// With several broker URLs (a cluster), a dead first one is passed over.
#[tokio::test]
async fn next_broker_url_is_used_when_one_is_down() {
    let gw = Gateway::start_with(|c| {
        c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
        c.amqp.urls = vec![common::AMQP_URL.to_owned()];
        c.amqp.connect_timeout = Duration::from_millis(500);
    })
    .await;
    let key = unique("urls");
    let (mut reader, mut writer) =
        common::reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    let receipt = writer
        .send_confirmed(&format!("/topic/{key}"), "via the second URL")
        .await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(
        common::body_text(&reader.recv_message().await),
        "via the second URL"
    );
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}
