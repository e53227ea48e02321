//! What the performance work must not change: acks to RabbitMQ gathered
//! into `multiple` acks still settle every auto-mode delivery (also when
//! traffic stops) and never one that waits for a client ACK; sessions
//! spread over more AMQP connections as they grow; the gateway's own
//! WebSocket upgrade refuses what is not one.

mod common;

use std::time::Duration;

use common::{scrape, unique, Client, Gateway, Management};
use stompgate::stomp::frame::Frame;

/// Unacknowledged messages of `queue` as RabbitMQ counts them now
/// (`rabbitmqctl`, not the management API's statistics, which lag).
async fn unacked(queue: &str) -> u64 {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (scripts/test needs it): {e}"));
    assert!(output.status.success(), "rabbitmqctl list_queues failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .map(|(_, n)| n.trim().parse().expect("a count"))
        .unwrap_or_else(|| panic!("queue {queue} not listed"))
}

#[tokio::test]
async fn held_acks_go_out_when_traffic_stops() {
    let gw = Gateway::start().await;
    let key = unique("held");
    let destination = format!("/topic/{key}");
    let (mut reader, session) = Client::connect(&gw).await;
    reader.subscribe("s", &destination).await;
    let (mut writer, _) = Client::connect(&gw).await;
    for i in 0..20 {
        writer.send_confirmed(&destination, &i.to_string()).await;
    }
    for _ in 0..20 {
        reader.recv_message().await;
    }
    // Nothing else happens on the session: the held acks must still go.
    let queue = gw.queue_of(&session);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = unacked(&queue).await;
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} deliveries still unacked in RabbitMQ 10 s after the last one"
        );
    }
    let metrics = scrape(&gw).await;
    assert_eq!(metrics["stompgate_deliveries_acked_total"], 20.0);
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_multiple_ack_never_covers_a_delivery_awaiting_its_client_ack() {
    let gw = Gateway::start().await;
    let key = unique("mixed");
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("auto", &format!("/topic/{key}.a")).await;
    reader
        .subscribe_with("manual", &format!("/topic/{key}.c"), "client-individual")
        .await;
    let (mut writer, _) = Client::connect(&gw).await;
    // a1 is held for a multiple ack; c1 then waits for the client; a2
    // must not be acked with `multiple`, which would settle c1 too.
    for (k, body) in [("a", "a1"), ("c", "c1"), ("a", "a2")] {
        writer
            .send_confirmed(&format!("/topic/{key}.{k}"), body)
            .await;
    }
    let mut c1 = None;
    for want in ["a1", "c1", "a2"] {
        let message = reader.recv_message().await;
        assert_eq!(common::body_text(&message), want);
        if want == "c1" {
            c1 = message.get("ack").map(str::to_owned);
        }
    }
    // RabbitMQ still holds c1: a NACK returns it. Had it been acked, the
    // NACK would name an unknown delivery tag and close the channel.
    let c1 = c1.expect("c1 carries an ack header");
    reader
        .send_frame(&Frame::new("NACK").header("id", c1.as_str()))
        .await;
    let again = reader.recv_message().await;
    assert_eq!(common::body_text(&again), "c1");
    assert_eq!(again.get("redelivered"), Some("true"));
    assert_eq!(
        again.get(stompgate::session::GAP_HEADER),
        None,
        "the session was not restored"
    );
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn sessions_spread_over_more_connections_as_they_grow() {
    let gw = Gateway::start_with(|c| c.amqp.sessions_per_connection = 2).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::connect(&gw).await.0);
    }
    let name = format!("stompgate {}", gw.config.server.node_id);
    let mgmt = Management::new();
    // The API's connection list comes from statistics that lag by seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let channels = loop {
        let list = mgmt
            .get("/connections?columns=client_properties,channels")
            .await
            .expect("connection list");
        let mut channels: Vec<u64> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["client_properties"]["connection_name"] == name.as_str())
            .filter_map(|c| c["channels"].as_u64())
            .collect();
        channels.sort();
        if channels.iter().sum::<u64>() == 5 {
            break channels;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "5 sessions' channels not seen within 20 s: {channels:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(channels, vec![1, 2, 2], "at most 2 sessions per connection");
    for client in clients {
        client.disconnect().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_plain_get_on_the_websocket_path_is_a_bad_request() {
    let gw = Gateway::start().await;
    let response = reqwest::get(gw.http_url("/ws")).await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("WebSocket upgrade"));
    gw.stop().await;
}
