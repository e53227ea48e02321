//! Plain AMQP clients and STOMP clients meet on amq.topic: headers and
//! properties map both ways as contract.md says.

mod common;

use std::time::Duration;

use common::{amqp_channel, amqp_consumer, body_text, unique, Client, Gateway, WAIT};
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use stompgate::stomp::frame::Frame;

#[tokio::test]
async fn amqp_publisher_reaches_stomp_subscribers() {
    let gw = Gateway::start().await;
    let key = format!("{}.no01", unique("interop"));
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &format!("/topic/{key}")).await;

    let (connection, channel) = amqp_channel().await;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-from"),
        AMQPValue::LongString(LongString::from("amqp 클라이언트")),
    );
    headers.insert(ShortString::from("x-num"), AMQPValue::LongInt(42));
    headers.insert(ShortString::from("x-flag"), AMQPValue::Boolean(true));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id("corr-1".into())
        .with_reply_to("/topic/replies".into())
        .with_priority(7)
        .with_delivery_mode(2)
        .with_expiration("60000".into())
        .with_message_id("amqp-1".into())
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            br#"{"paper":"no01"}"#,
            properties,
        )
        .await
        .unwrap();
    confirm.await.unwrap();

    let message = reader.recv_message().await;
    assert_eq!(body_text(&message), r#"{"paper":"no01"}"#);
    assert_eq!(
        message.get("destination"),
        Some(format!("/topic/{key}").as_str())
    );
    for (name, value) in [
        ("content-type", "application/json"),
        ("correlation-id", "corr-1"),
        ("reply-to", "/topic/replies"),
        ("priority", "7"),
        ("persistent", "true"),
        ("expiration", "60000"),
        ("amqp-message-id", "amqp-1"),
        ("x-from", "amqp 클라이언트"),
        ("x-num", "42"),
        ("x-flag", "true"),
    ] {
        assert_eq!(message.get(name), Some(value), "header {name}");
    }
    connection.close(200, "done".into()).await.unwrap();
    reader.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn stomp_send_reaches_amqp_consumers_with_its_headers() {
    let gw = Gateway::start().await;
    let key = format!("{}.no02", unique("interop"));
    let (connection, channel) = amqp_channel().await;
    let mut consumer = amqp_consumer(&channel, &key).await;

    let (mut writer, _) = Client::connect(&gw).await;
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", format!("/pub/{key}"))
                .header("receipt", "r")
                .header("content-type", "text/plain")
                .header("persistent", "true")
                .header("priority", "5")
                .header("correlation-id", "c-9")
                .header("reply-to", "/topic/back")
                .header("expiration", "30000")
                .header("x-paper", "한겨레")
                .header("x-paper", "ignored: first wins")
                .body(&b"from STOMP"[..]),
        )
        .await;
    let receipt = writer.expect_receipt("r").await;
    assert_eq!(receipt.get("routed"), Some("true"));

    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("AMQP delivery within the wait")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"from STOMP");
    assert_eq!(delivery.routing_key.as_str(), key);
    let p = &delivery.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(*p.priority(), Some(5));
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c-9"));
    assert_eq!(
        p.reply_to().as_ref().map(|s| s.as_str()),
        Some("/topic/back")
    );
    assert_eq!(p.expiration().as_ref().map(|s| s.as_str()), Some("30000"));
    let headers = p.headers().as_ref().expect("AMQP headers");
    let x_paper = headers.inner().get("x-paper").expect("x-paper header");
    assert_eq!(
        *x_paper,
        AMQPValue::LongString(LongString::from("한겨레")),
        "first of repeated headers wins"
    );
    // STOMP's own headers stay behind.
    for own in ["destination", "receipt", "content-length"] {
        assert!(!headers.contains_key(own), "{own} leaked into AMQP headers");
    }
    connection.close(200, "done".into()).await.unwrap();
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn invalid_property_headers_are_refused() {
    let gw = Gateway::start().await;
    for (name, value) in [
        ("priority", "high"),
        ("expiration", "-1"),
        ("persistent", "yes"),
    ] {
        let (mut client, _) = Client::connect(&gw).await;
        client
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", "/topic/x")
                    .header(name, value),
            )
            .await;
        let error = tokio::time::timeout(Duration::from_secs(15), client.expect_error())
            .await
            .unwrap();
        assert_eq!(error.get("message"), Some("invalid header"));
        assert!(body_text(&error).contains(name));
    }
    gw.stop().await;
}
