//! The source document's third caveat: each subscriber's queue works on
//! its own. A subscriber that stops reading holds its messages in its own
//! RabbitMQ queue, and the others on the same channel, on the same node or
//! another, are not slowed.

mod common;

use std::time::Duration;

use common::{reader_and_writer, unique, Client, Gateway, Management};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_slow_the_others() {
    let gw = Gateway::start_with(|c| c.amqp.prefetch = 16).await;
    let mgmt = Management::new();
    let key = unique("slow");
    let dest = format!("/topic/{key}");
    let (mut stalled, stalled_session) = Client::connect(&gw).await;
    stalled.subscribe("s", &dest).await;
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &dest).await;
    // A reader of the same channel on another gateway node.
    let other_node = Gateway::start().await;
    let (mut remote_reader, _) = Client::connect(&other_node).await;
    remote_reader.subscribe("s", &dest).await;

    // 400 × 64 KiB = 25 MiB: far more than socket buffers hold, so the
    // stalled client's session blocks on its writes.
    let count = 400;
    let body = "n".repeat(64 * 1024);
    let (mut writer, _) = Client::connect(&gw).await;
    for i in 0..count {
        writer.send(&dest, &format!("{i:04}{body}")).await;
    }
    let receipt = writer.send_confirmed(&dest, "last").await;
    assert_eq!(receipt.get("routed"), Some("true"));

    // The readers get everything while `stalled` reads nothing.
    for reader in [&mut reader, &mut remote_reader] {
        for i in 0..count {
            let message = reader.recv_message().await;
            assert_eq!(&message.body[..4], format!("{i:04}").as_bytes());
        }
        assert_eq!(reader.recv_message().await.body.as_ref(), b"last");
    }

    // The stalled subscriber's backlog waits in RabbitMQ, not in the
    // gateway (at most the prefetch is out of the queue).
    let queue = gw.queue_of(&stalled_session);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = mgmt.queue(&queue).await.unwrap()["messages_ready"]
            .as_u64()
            .unwrap_or(0);
        if ready > 300 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled subscriber's queue holds only {ready} ready messages"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 64 KiB messages are past amqp.no_ack_max_body: both subscribers on
    // this node consume with acks, so the prefetch bounds what they hold.
    // A session that finds a prefetch's worth waiting at its first take
    // moves for that reason ("backlog", checked first) instead.
    let metrics = common::scrape(&gw).await;
    let moved = |reason: &str| {
        let name = format!(r#"stompgate_acked_consumption_total{{reason="{reason}"}}"#);
        metrics.get(&name).copied().unwrap_or(0.0)
    };
    assert_eq!(
        moved("large_message") + moved("backlog"),
        2.0,
        "{metrics:?}"
    );

    // When it reads again it gets everything, in order: nothing was lost.
    for i in 0..count {
        let message = stalled.recv_message().await;
        assert_eq!(&message.body[..4], format!("{i:04}").as_bytes());
    }
    assert_eq!(stalled.recv_message().await.body.as_ref(), b"last");
    for client in [stalled, reader, writer, remote_reader] {
        client.disconnect().await;
    }
    gw.stop().await;
    other_node.stop().await;
}

/// A client that makes no progress for stomp.slow_client_timeout is closed
/// (and counted); meanwhile its queue never grows past
/// amqp.queue_max_length or amqp.queue_max_bytes, and the other reader is
/// served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_client_is_closed_and_its_queue_stays_bounded() {
    let gw = Gateway::start_with(|c| {
        c.amqp.prefetch = 4;
        c.amqp.queue_max_length = 50;
        // 20 of the 64 KiB messages below: the byte bound comes first.
        c.amqp.queue_max_bytes = 20 * 65 * 1024;
        c.stomp.slow_client_timeout = Duration::from_secs(1);
    })
    .await;
    let mgmt = Management::new();
    let key = unique("stuck");
    let dest = format!("/topic/{key}");
    let (mut stuck, stuck_session) = Client::connect(&gw).await;
    stuck.subscribe("s", &dest).await;
    let queue = gw.queue_of(&stuck_session);
    let arguments = mgmt.queue(&queue).await.unwrap()["arguments"].clone();
    assert_eq!(arguments["x-max-length"], 50);
    assert_eq!(arguments["x-max-length-bytes"], 20 * 65 * 1024);
    assert_eq!(arguments["x-overflow"], "drop-head");
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;

    // The reader keeps up (one in, one out), so its own bounded queue
    // never fills; the stuck client's does, and RabbitMQ drops its oldest.
    let body = "s".repeat(64 * 1024);
    for i in 0..400 {
        writer.send(&dest, &format!("{i:04}{body}")).await;
        let message = reader.recv_message().await;
        assert_eq!(&message.body[..4], format!("{i:04}").as_bytes());
        if i % 50 == 49 {
            if let Some(stuck_queue) = mgmt.queue(&queue).await {
                let bytes = stuck_queue["message_bytes"].as_u64().unwrap_or(0);
                assert!(
                    bytes <= 20 * 65 * 1024,
                    "the stuck queue holds {bytes} bytes"
                );
            }
        }
    }
    // The stuck session is closed and its queue deleted...
    mgmt.wait_no_queues(&queue, Duration::from_secs(20)).await;
    // ...and the count says why.
    let metrics = common::scrape(&gw).await;
    assert_eq!(metrics["stompgate_slow_client_disconnects_total"], 1.0);
    assert_eq!(
        metrics[r#"stompgate_refusals_total{limit="stomp.slow_client_timeout"}"#],
        1.0
    );
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}
