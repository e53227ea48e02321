//! Several gateway nodes as real processes on one real RabbitMQ, and real
//! faults driven with `rabbitmqctl`: connections closed by the broker, the
//! broker application stopped and started, a node killed with SIGKILL.
//!
//! These tests disturb the whole broker, so they take turns (one lock for
//! the binary), and every test that stops RabbitMQ restores it when it
//! ends, failed or not.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{body_text, require_rabbitmq, unique, Client, Gateway, Management, Node, WAIT};
use stompgate::stomp::frame::Frame;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (scripts/test needs it): {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Stops the RabbitMQ application; dropping the guard starts it again and
/// waits until it is up, even when the test panicked.
struct BrokerStopped;

impl BrokerStopped {
    fn now() -> BrokerStopped {
        rabbitmqctl(&["stop_app"]);
        BrokerStopped
    }

    fn restart(self) {
        drop(self);
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup", "--timeout", "120"]);
    }
}

/// Waits until the management API answers again after a restart.
async fn wait_management() {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = reqwest::Client::new()
            .get(format!("{}/overview", common::MGMT))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "management API not back within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn readyz(gw: &Gateway) -> u16 {
    reqwest::get(gw.http_url("/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Polls until `/readyz` answers `status`.
async fn wait_readyz(gw: &Gateway, status: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if readyz(gw).await == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not answer {status} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the management API until `queue` has `binding` again: the session
/// restored its queue and subscriptions.
async fn wait_bound(mgmt: &Management, queue: &str, binding: &(String, String), within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if mgmt.bindings(queue).await.contains(binding) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {queue} not bound to {binding:?} again within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three nodes, readers spread over them, two publishers on different
/// nodes: every reader gets exactly its channels' messages, in order per
/// publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_fan_out() {
    let _turn = TURN.lock().await;
    require_rabbitmq().await;
    let nodes: Vec<Node> = (0..3).map(|_| Node::spawn(&[])).collect();
    let root = unique("fan");
    let no01 = format!("/topic/{root}.no01");
    let no02 = format!("/topic/{root}.no02");
    // (node, channels read)
    let plan: [(usize, &[&str]); 5] = [
        (0, &["no01"]),
        (1, &["no01"]),
        (1, &["no02"]),
        (2, &["no01", "no02"]),
        (2, &["no02"]),
    ];
    let mut readers = Vec::new();
    for (node, channels) in plan {
        let (mut client, _) = Client::connect(&nodes[node].gateway).await;
        for channel in channels {
            client
                .subscribe(channel, &format!("/topic/{root}.{channel}"))
                .await;
        }
        readers.push((client, channels));
    }
    let (mut pub_a, _) = Client::connect(&nodes[0].gateway).await;
    let (mut pub_c, _) = Client::connect(&nodes[2].gateway).await;
    let count = 50;
    for i in 0..count {
        for (name, publisher) in [("a", &mut pub_a), ("c", &mut pub_c)] {
            let dest = if i % 2 == 0 { &no01 } else { &no02 };
            publisher.send(dest, &format!("{name}:{i}")).await;
        }
    }
    for (name, publisher) in [("a", &mut pub_a), ("c", &mut pub_c)] {
        publisher
            .send_confirmed(&no01, &format!("{name}:end"))
            .await;
    }
    for (reader, channels) in &mut readers {
        let wants_no01 = channels.contains(&"no01");
        let wants_no02 = channels.contains(&"no02");
        let expected: usize = (0..count)
            .filter(|i| if i % 2 == 0 { wants_no01 } else { wants_no02 })
            .count()
            * 2
            + if wants_no01 { 2 } else { 0 };
        let mut last: HashMap<String, i64> = HashMap::new();
        let mut got = 0;
        while got < expected {
            let message = reader.recv_message().await;
            got += 1;
            let channel = message.get("subscription").unwrap().to_owned();
            assert!(channels.contains(&channel.as_str()), "stray {message:?}");
            let (publisher, n) = body_text(&message).split_once(':').unwrap();
            let n: i64 = if n == "end" {
                i64::MAX
            } else {
                n.parse().unwrap()
            };
            let previous = last.insert(publisher.to_owned(), n).unwrap_or(-1);
            assert!(
                n > previous,
                "out of order from {publisher}: {n} after {previous}"
            );
            assert!(
                n == i64::MAX || (n % 2 == 0) == (channel == "no01"),
                "{message:?} on the wrong channel"
            );
        }
    }
    // Nothing else is on its way: a last marker on both channels is the
    // very next message of every reader.
    pub_a.send_confirmed(&no01, "marker").await;
    pub_a.send_confirmed(&no02, "marker").await;
    for (reader, channels) in &mut readers {
        for _ in 0..channels.len() {
            assert_eq!(body_text(&reader.recv_message().await), "marker");
        }
    }
}

/// RabbitMQ closes every connection: sessions stay open, their queues and
/// bindings come back by themselves, and the first MESSAGE after the gap
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_recover() {
    let _turn = TURN.lock().await;
    require_rabbitmq().await;
    let node = Node::spawn(&[("STOMPGATE__AMQP__RECONNECT_MAX", "1s")]);
    let gw = &node.gateway;
    let mgmt = Management::new();
    let key = unique("cut");
    let dest = format!("/topic/{key}");
    let (mut reader, session) = Client::connect(gw).await;
    reader.subscribe("s", &dest).await;
    let (mut writer, _) = Client::connect(gw).await;
    writer.send_confirmed(&dest, "before").await;
    assert_eq!(body_text(&reader.recv_message().await), "before");

    let cut = Instant::now();
    rabbitmqctl(&["close_all_connections", "stompgate fault test"]);
    let binding = ("amq.topic".to_owned(), key.clone());
    wait_bound(
        &mgmt,
        &gw.queue_of(&session),
        &binding,
        Duration::from_secs(20),
    )
    .await;
    let receipt = writer.send_confirmed(&dest, "after").await;
    let recovered = cut.elapsed();
    assert_eq!(receipt.get("routed"), Some("true"));
    let message = reader.recv_message().await;
    assert_eq!(body_text(&message), "after");
    assert_eq!(message.get("stompgate-gap"), Some("true"));
    // Only the first MESSAGE after the gap carries the mark.
    writer.send_confirmed(&dest, "later").await;
    assert_eq!(reader.recv_message().await.get("stompgate-gap"), None);
    println!("recovered after close_all_connections in {recovered:?}");
    reader.disconnect().await;
    writer.disconnect().await;
}

/// The broker application stops and starts again: /readyz says 503 in
/// between, new WebSocket connections are refused with the reason, a SEND
/// made during the outage is confirmed once the broker is back, and
/// sessions carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_recovers_and_confirms_held_sends() {
    let _turn = TURN.lock().await;
    require_rabbitmq().await;
    let node = Node::spawn(&[
        ("STOMPGATE__AMQP__RECONNECT_MAX", "1s"),
        ("STOMPGATE__AMQP__PUBLISH_TIMEOUT", "60s"),
    ]);
    let gw = &node.gateway;
    let key = unique("restart");
    let dest = format!("/topic/{key}");
    let (mut reader, session) = Client::connect(gw).await;
    reader.subscribe("s", &dest).await;
    let (mut writer, _) = Client::connect(gw).await;
    assert_eq!(readyz(gw).await, 200);

    let stopped = BrokerStopped::now();
    let outage = Instant::now();
    wait_readyz(gw, 503, WAIT).await;
    let request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(gw.ws_url())
            .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("a new WebSocket during the outage: expected 503, got {other:?}"),
    }
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", dest.as_str())
                .header("receipt", "held")
                .body(&b"during the outage"[..]),
        )
        .await;
    // The sessions are alive meanwhile: a frame without a broker round
    // trip is answered.
    reader
        .send_frame(
            &Frame::new("BEGIN")
                .header("transaction", "t")
                .header("receipt", "alive"),
        )
        .await;
    reader.expect_receipt("alive").await;

    stopped.restart();
    let receipt = writer.expect_receipt("held").await;
    let confirmed_after = outage.elapsed();
    // Whether the reader's queue was back in time for it is the gap the
    // gateway reports; the receipt tells the writer which it was.
    let routed = receipt.get("routed").unwrap().to_owned();
    wait_readyz(gw, 200, Duration::from_secs(30)).await;
    wait_management().await;
    let mgmt = Management::new();
    let binding = ("amq.topic".to_owned(), key.clone());
    wait_bound(
        &mgmt,
        &gw.queue_of(&session),
        &binding,
        Duration::from_secs(30),
    )
    .await;
    let recovered = outage.elapsed();
    writer.send_confirmed(&dest, "after").await;
    let first = reader.recv_message().await;
    assert_eq!(first.get("stompgate-gap"), Some("true"));
    if routed == "true" && body_text(&first) == "during the outage" {
        assert_eq!(body_text(&reader.recv_message().await), "after");
    } else {
        assert_eq!(body_text(&first), "after");
    }
    println!(
        "broker restart: held SEND confirmed {confirmed_after:?} after stop_app (routed:{routed}); \
         reader's queue and binding back {recovered:?} after stop_app"
    );
    reader.disconnect().await;
    writer.disconnect().await;
}

/// A SEND the broker cannot confirm within amqp.publish_timeout gets an
/// ERROR naming the receipt, never a RECEIPT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmable_send_gets_an_error_not_a_receipt() {
    let _turn = TURN.lock().await;
    require_rabbitmq().await;
    let node = Node::spawn(&[("STOMPGATE__AMQP__PUBLISH_TIMEOUT", "2s")]);
    let gw = &node.gateway;
    let (mut writer, _) = Client::connect(gw).await;
    let stopped = BrokerStopped::now();
    wait_readyz(gw, 503, WAIT).await;
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", format!("/topic/{}", unique("lost")))
                .header("receipt", "never")
                .body(&b"x"[..]),
        )
        .await;
    let error = writer.expect_error().await;
    assert_eq!(error.get("message"), Some("broker unavailable"));
    assert_eq!(error.get("receipt-id"), Some("never"));
    assert!(body_text(&error).contains("amqp.publish_timeout"));
    stopped.restart();
    wait_readyz(gw, 200, Duration::from_secs(30)).await;
    wait_management().await;
}

/// SIGKILL of a node: its exclusive queues go with its AMQP connections;
/// the other node's clients do not notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_leaves_no_queue_and_disturbs_no_one() {
    let _turn = TURN.lock().await;
    require_rabbitmq().await;
    let mgmt = Management::new();
    let mut doomed = Node::spawn(&[]);
    let survivor = Node::spawn(&[]);
    let key = unique("kill");
    let dest = format!("/topic/{key}");
    let mut doomed_clients = Vec::new();
    for _ in 0..3 {
        let (mut client, _) = Client::connect(&doomed.gateway).await;
        client.subscribe("s", &dest).await;
        doomed_clients.push(client);
    }
    let (mut reader, _) = Client::connect(&survivor.gateway).await;
    reader.subscribe("s", &dest).await;
    let (mut writer, _) = Client::connect(&survivor.gateway).await;
    assert_eq!(mgmt.queues(&doomed.gateway.queue_prefix()).await.len(), 3);

    doomed.signal("-KILL");
    doomed.wait_exit(WAIT);
    mgmt.wait_no_queues(&doomed.gateway.queue_prefix(), Duration::from_secs(5))
        .await;
    for i in 0..20 {
        writer.send(&dest, &i.to_string()).await;
    }
    for i in 0..20 {
        assert_eq!(body_text(&reader.recv_message().await), i.to_string());
    }
    reader.disconnect().await;
    writer.disconnect().await;
}
