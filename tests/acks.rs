//! Acknowledgement modes, NACK redelivery and transactions, against the
//! real RabbitMQ. A small `amqp.prefetch` makes acks observable: RabbitMQ
//! sends the next message only once the gateway has acked one.

mod common;

use common::{body_text, reader_and_writer, unique, Client, Gateway};
use stompgate::stomp::frame::Frame;

async fn gateway_with_prefetch(prefetch: u16) -> Gateway {
    Gateway::start_with(|c| c.amqp.prefetch = prefetch).await
}

async fn ack(client: &mut Client, message: &Frame) {
    let id = message.get("ack").expect("ack header in client modes");
    client.send_frame(&Frame::new("ACK").header("id", id)).await;
}

/// Auto mode: the gateway acks once the MESSAGE is written, so far more
/// than `prefetch` messages flow without the client doing anything.
#[tokio::test]
async fn auto_mode_acks_for_the_client() {
    let gw = gateway_with_prefetch(2).await;
    let key = unique("auto");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    for i in 0..20 {
        writer.send(&format!("/topic/{key}"), &i.to_string()).await;
    }
    for i in 0..20 {
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), i.to_string());
        assert_eq!(
            message.get("ack"),
            None,
            "auto mode MESSAGE has no ack header"
        );
    }
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// client-individual: each ACK frees exactly one prefetch slot, in any order.
#[tokio::test]
async fn client_individual_acks_one_at_a_time() {
    let gw = gateway_with_prefetch(3).await;
    let key = unique("ind");
    let (mut reader, mut writer) =
        reader_and_writer(&gw, &format!("/topic/{key}"), "client-individual").await;
    for i in 0..6 {
        writer
            .send_confirmed(&format!("/topic/{key}"), &i.to_string())
            .await;
    }
    let mut first: Vec<Frame> = Vec::new();
    for i in 0..3 {
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), i.to_string());
        first.push(message);
    }
    // Prefetch is full: the next frame is the marker's receipt, no MESSAGE.
    reader
        .send_frame(
            &Frame::new("BEGIN")
                .header("transaction", "m")
                .header("receipt", "mark"),
        )
        .await;
    reader.expect_receipt("mark").await;
    // ACK the middle one: exactly one more arrives.
    ack(&mut reader, &first[1]).await;
    assert_eq!(body_text(&reader.recv_message().await), "3");
    ack(&mut reader, &first[2]).await;
    ack(&mut reader, &first[0]).await;
    let a = reader.recv_message().await;
    let b = reader.recv_message().await;
    assert_eq!((body_text(&a), body_text(&b)), ("4", "5"));
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// client: an ACK covers every earlier MESSAGE of the subscription.
#[tokio::test]
async fn client_mode_ack_is_cumulative() {
    let gw = gateway_with_prefetch(3).await;
    let key = unique("cum");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "client").await;
    for i in 0..6 {
        writer
            .send_confirmed(&format!("/topic/{key}"), &i.to_string())
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(reader.recv_message().await);
    }
    // ACK of the third settles all three: three more arrive.
    ack(&mut reader, &seen[2]).await;
    for i in 3..6 {
        assert_eq!(body_text(&reader.recv_message().await), i.to_string());
    }
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// NACK returns the message to the queue; it comes back marked redelivered.
#[tokio::test]
async fn nack_redelivers() {
    let gw = gateway_with_prefetch(10).await;
    let key = unique("nack");
    let (mut reader, mut writer) =
        reader_and_writer(&gw, &format!("/topic/{key}"), "client-individual").await;
    writer
        .send_confirmed(&format!("/topic/{key}"), "try again")
        .await;
    let first = reader.recv_message().await;
    assert_eq!(first.get("redelivered"), None);
    reader
        .send_frame(&Frame::new("NACK").header("id", first.get("ack").unwrap()))
        .await;
    let again = reader.recv_message().await;
    assert_eq!(body_text(&again), "try again");
    assert_eq!(again.get("redelivered"), Some("true"));
    assert_ne!(
        again.get("ack"),
        first.get("ack"),
        "a new delivery, a new ack id"
    );
    ack(&mut reader, &again).await;
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Transactional SENDs are published on COMMIT, in order, and never on ABORT.
#[tokio::test]
async fn transactions_commit_and_abort_sends() {
    let gw = Gateway::start().await;
    let key = unique("tx");
    let dest = format!("/topic/{key}");
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "auto").await;

    writer
        .send_frame(&Frame::new("BEGIN").header("transaction", "t1"))
        .await;
    for body in ["a", "b"] {
        writer
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", dest.as_str())
                    .header("transaction", "t1")
                    .body(body.as_bytes().to_vec()),
            )
            .await;
    }
    // Outside the transaction: published now, so it arrives first.
    writer.send_confirmed(&dest, "outside").await;
    assert_eq!(body_text(&reader.recv_message().await), "outside");
    writer
        .send_frame(
            &Frame::new("COMMIT")
                .header("transaction", "t1")
                .header("receipt", "c1"),
        )
        .await;
    writer.expect_receipt("c1").await;
    assert_eq!(body_text(&reader.recv_message().await), "a");
    assert_eq!(body_text(&reader.recv_message().await), "b");

    writer
        .send_frame(&Frame::new("BEGIN").header("transaction", "t2"))
        .await;
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", dest.as_str())
                .header("transaction", "t2")
                .body(&b"aborted"[..]),
        )
        .await;
    writer
        .send_frame(
            &Frame::new("ABORT")
                .header("transaction", "t2")
                .header("receipt", "a2"),
        )
        .await;
    writer.expect_receipt("a2").await;
    writer.send_confirmed(&dest, "after abort").await;
    assert_eq!(body_text(&reader.recv_message().await), "after abort");
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// ACKs inside a transaction take effect on COMMIT and not on ABORT.
#[tokio::test]
async fn transactional_acks() {
    let gw = gateway_with_prefetch(1).await;
    let key = unique("txack");
    let dest = format!("/topic/{key}");
    let (mut reader, mut writer) = reader_and_writer(&gw, &dest, "client-individual").await;
    writer.send_confirmed(&dest, "m1").await;
    writer.send_confirmed(&dest, "m2").await;

    let m1 = reader.recv_message().await;
    reader
        .send_frame(&Frame::new("BEGIN").header("transaction", "t"))
        .await;
    reader
        .send_frame(
            &Frame::new("ACK")
                .header("id", m1.get("ack").unwrap())
                .header("transaction", "t"),
        )
        .await;
    reader
        .send_frame(&Frame::new("COMMIT").header("transaction", "t"))
        .await;
    // Prefetch 1: m2 can only come once m1's ACK was applied.
    let m2 = reader.recv_message().await;
    assert_eq!(body_text(&m2), "m2");

    // An aborted ACK is not applied: the NACK after it still redelivers.
    reader
        .send_frame(&Frame::new("BEGIN").header("transaction", "u"))
        .await;
    reader
        .send_frame(
            &Frame::new("ACK")
                .header("id", m2.get("ack").unwrap())
                .header("transaction", "u"),
        )
        .await;
    reader
        .send_frame(&Frame::new("ABORT").header("transaction", "u"))
        .await;
    reader
        .send_frame(&Frame::new("NACK").header("id", m2.get("ack").unwrap()))
        .await;
    let again = reader.recv_message().await;
    assert_eq!(body_text(&again), "m2");
    assert_eq!(again.get("redelivered"), Some("true"));
    ack(&mut reader, &again).await;
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn transaction_limits_and_unknown_transactions() {
    let gw = Gateway::start_with(|c| c.stomp.max_transaction_frames = 3).await;
    let dest = format!("/topic/{}", unique("txl"));
    let (mut client, _) = Client::connect(&gw).await;
    client
        .send_frame(&Frame::new("BEGIN").header("transaction", "t"))
        .await;
    for _ in 0..4 {
        client
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", dest.as_str())
                    .header("transaction", "t"),
            )
            .await;
    }
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("limit exceeded"));
    assert!(body_text(&error).contains("stomp.max_transaction_frames"));

    let (mut client, _) = Client::connect(&gw).await;
    client
        .send_frame(
            &Frame::new("COMMIT")
                .header("transaction", "never")
                .header("receipt", "x"),
        )
        .await;
    let error = client.expect_error().await;
    assert_eq!(error.get("receipt-id"), Some("x"));
    assert!(body_text(&error).contains("never"));
    gw.stop().await;
}
