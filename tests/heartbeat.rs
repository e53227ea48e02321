//! Heart-beat negotiation and enforcement, both directions.

mod common;

use std::time::Duration;

use common::{unique, Client, Gateway};
use stompgate::stomp::frame::Frame;

async fn connect_with_heartbeat(gw: &Gateway, heart_beat: &str) -> (Client, Frame) {
    let mut client = Client::open(gw).await;
    client
        .send_frame(
            &Frame::new("CONNECT")
                .header("accept-version", "1.2")
                .header("host", "/")
                .header("heart-beat", heart_beat),
        )
        .await;
    let connected = client.recv().await;
    assert_eq!(connected.command, "CONNECTED");
    (client, connected)
}

#[tokio::test]
async fn negotiation_follows_the_contract() {
    let gw = Gateway::start().await;
    // The server sends as often as asked, expects as often as offered...
    let (client, connected) = connect_with_heartbeat(&gw, "4000,3000").await;
    assert_eq!(connected.get("heart-beat"), Some("3000,4000"));
    client.disconnect().await;
    // ...never faster than stomp.heartbeat_min (250 ms); 0 stays 0.
    let (client, connected) = connect_with_heartbeat(&gw, "10,0").await;
    assert_eq!(connected.get("heart-beat"), Some("0,250"));
    client.disconnect().await;
    // ...and never slower than stomp.heartbeat_max (1 h), however large
    // the client's numbers.
    let huge = "18446744073709551615,18446744073709551615";
    let (mut client, connected) = connect_with_heartbeat(&gw, huge).await;
    assert_eq!(connected.get("heart-beat"), Some("3600000,3600000"));
    client
        .subscribe("s", &format!("/topic/{}", unique("hb")))
        .await;
    client.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn server_sends_heartbeats_as_one_byte_messages() {
    let gw = Gateway::start().await;
    let (mut client, connected) = connect_with_heartbeat(&gw, "0,300").await;
    assert_eq!(connected.get("heart-beat"), Some("300,0"));
    client.wait_heartbeats(3, Duration::from_secs(5)).await;
    client.disconnect().await;
    gw.stop().await;
}

/// A client that keeps beating stays; one that falls silent is told and
/// closed after twice its period.
#[tokio::test]
async fn silent_client_is_closed() {
    let gw = Gateway::start().await;
    let (mut client, connected) = connect_with_heartbeat(&gw, "300,0").await;
    assert_eq!(connected.get("heart-beat"), Some("0,300"));
    // Beat for well over 2× the period (pacing the client, not waiting on
    // the server), then prove the session is alive.
    for _ in 0..8 {
        client.send_raw(b"\n").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let key = unique("hb");
    client.subscribe("s", &format!("/topic/{key}")).await;
    // Now silence: ERROR, then close.
    let error = client.expect_error().await;
    assert_eq!(error.get("message"), Some("heart-beat timeout"));
    gw.stop().await;
}
