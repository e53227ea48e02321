//! What operators scrape and query: `/metrics` moves by exactly the right
//! amounts over a scripted newspaper session, and `/admin/sessions` lists
//! live sessions behind its bearer token.

mod common;

use std::collections::HashMap;

use common::{body_text, scrape, settle, unique, Client, Gateway};
use stompgate::stomp::frame::Frame;

fn value(metrics: &HashMap<String, f64>, name: &str) -> f64 {
    metrics.get(name).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_a_newspaper_session_exactly() {
    let gw = Gateway::start().await;
    let root = unique("m");
    let (no01, no02) = (format!("/topic/{root}.no01"), format!("/topic/{root}.no02"));
    let (mut user1, _) = Client::connect(&gw).await;
    let (mut user2, _) = Client::connect(&gw).await;
    let (mut user3, _) = Client::connect(&gw).await;
    user1.subscribe("s", &no01).await;
    user2.subscribe("s", &no01).await;
    user3.subscribe("s", &no02).await;
    let (mut publisher, _) = Client::connect(&gw).await;

    let live = scrape(&gw).await;
    assert_eq!(value(&live, "stompgate_connections_open"), 4.0);
    assert_eq!(value(&live, r#"stompgate_sessions{version="1.2"}"#), 4.0);
    assert_eq!(value(&live, "stompgate_subscriptions"), 3.0);
    assert_eq!(value(&live, "stompgate_broker_up"), 1.0);
    assert!(value(&live, "stompgate_broker_connections_opened_total") >= 1.0);

    for i in 0..5 {
        let receipt = publisher.send_confirmed(&no01, &format!("issue {i}")).await;
        assert_eq!(receipt.get("routed"), Some("true"));
    }
    publisher.send_confirmed(&no02, "other paper").await;
    let receipt = publisher
        .send_confirmed(&format!("/topic/{root}.nobody"), "lost")
        .await;
    assert_eq!(receipt.get("routed"), Some("false"));
    for reader in [&mut user1, &mut user2] {
        for i in 0..5 {
            assert_eq!(
                body_text(&reader.recv_message().await),
                format!("issue {i}")
            );
        }
    }
    assert_eq!(body_text(&user3.recv_message().await), "other paper");

    let mut bad = Client::open(&gw).await;
    bad.handshake(Frame::new("CONNECT").header("accept-version", "1.2"))
        .await;
    bad.send_raw(b"SHOUT\n\n\0").await;
    bad.expect_error().await;
    for client in [user1, user2, user3, publisher] {
        client.disconnect().await;
    }
    settle(&gw, "stompgate_connections_open", 0.0).await;

    let m = scrape(&gw).await;
    let expect = [
        (r#"stompgate_frames_received_total{command="CONNECT"}"#, 5.0),
        (
            r#"stompgate_frames_received_total{command="SUBSCRIBE"}"#,
            3.0,
        ),
        (r#"stompgate_frames_received_total{command="SEND"}"#, 7.0),
        (
            r#"stompgate_frames_received_total{command="DISCONNECT"}"#,
            4.0,
        ),
        (r#"stompgate_frames_received_total{command="OTHER"}"#, 1.0),
        (r#"stompgate_frames_sent_total{command="CONNECTED"}"#, 5.0),
        // 3 SUBSCRIBE + 7 SEND + 4 DISCONNECT receipts
        (r#"stompgate_frames_sent_total{command="RECEIPT"}"#, 14.0),
        (r#"stompgate_frames_sent_total{command="MESSAGE"}"#, 11.0),
        (r#"stompgate_frames_sent_total{command="ERROR"}"#, 1.0),
        (r#"stompgate_errors_total{reason="unknown command"}"#, 1.0),
        ("stompgate_messages_published_total", 7.0),
        ("stompgate_messages_unroutable_total", 1.0),
        ("stompgate_publish_confirm_seconds_count", 7.0),
        ("stompgate_deliveries_total", 11.0),
        ("stompgate_messages_delivered_total", 11.0),
        // Readers that keep up on auto subscriptions consume without acks.
        ("stompgate_deliveries_acked_total", 0.0),
        ("stompgate_deliveries_requeued_total", 0.0),
        ("stompgate_heartbeat_timeouts_total", 0.0),
        ("stompgate_slow_client_disconnects_total", 0.0),
        (r#"stompgate_sessions{version="1.2"}"#, 0.0),
        ("stompgate_subscriptions", 0.0),
    ];
    for (name, want) in expect {
        assert_eq!(value(&m, name), want, "{name}");
    }
    // Every name carries the prefix; no label carries a session id.
    for name in m.keys() {
        assert!(name.starts_with("stompgate_"), "{name}");
        assert!(!name.contains("session="), "{name}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn heartbeat_timeouts_are_counted() {
    let gw = Gateway::start().await;
    let mut client = Client::open(&gw).await;
    client
        .handshake(
            Frame::new("CONNECT")
                .header("accept-version", "1.2")
                .header("heart-beat", "250,0"),
        )
        .await;
    client.expect_error().await;
    settle(&gw, "stompgate_heartbeat_timeouts_total", 1.0).await;
    let m = scrape(&gw).await;
    assert_eq!(
        value(&m, r#"stompgate_errors_total{reason="heart-beat timeout"}"#),
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn admin_sessions_behind_a_bearer_token() {
    let token = "s3cret-token";
    let gw = Gateway::start_with(|c| c.server.admin_token = token.to_owned()).await;
    let http = reqwest::Client::new();
    let url = gw.http_url("/admin/sessions");
    let missing = http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    let wrong = http
        .get(&url)
        .bearer_auth("s3cret-tokeX")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let key = unique("adm");
    let mut reader = Client::open(&gw).await;
    let reader_session = reader
        .handshake(
            Frame::new("CONNECT")
                .header("accept-version", "1.2")
                .header("login", "editor"),
        )
        .await;
    reader.subscribe("paper", &format!("/sub/{key}")).await;
    let (mut writer, writer_session) = Client::connect(&gw).await;
    writer.send_confirmed(&format!("/pub/{key}"), "hello").await;
    reader.recv_message().await;

    let list = common::admin_sessions(&gw, token).await;
    let sessions = list.as_array().expect("a JSON list");
    assert_eq!(sessions.len(), 2, "{list}");
    let find = |id: &str| {
        sessions
            .iter()
            .find(|s| s["session"] == id)
            .unwrap_or_else(|| panic!("session {id} not listed: {list}"))
            .clone()
    };
    let r = find(&reader_session);
    assert_eq!(r["user"], "editor");
    assert_eq!(r["version"], "1.2");
    assert_eq!(r["queue"], gw.queue_of(&reader_session));
    assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(r["subscriptions"][0]["id"], "paper");
    assert_eq!(r["subscriptions"][0]["destination"], format!("/sub/{key}"));
    assert_eq!(r["messages_out"], 1);
    assert!(r["connected_since"].as_u64().unwrap() > 1_700_000_000);
    let w = find(&writer_session);
    assert_eq!(w["messages_in"], 1);
    assert_eq!(w["user"], serde_json::Value::Null);

    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;

    // No token configured: the endpoint does not exist.
    let gw = Gateway::start().await;
    let disabled = http
        .get(gw.http_url("/admin/sessions"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 404);
    gw.stop().await;
}

#[tokio::test]
async fn demo_page_and_its_client_are_served() {
    let gw = Gateway::start().await;
    let page = reqwest::get(gw.http_url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/static/stomp.umd.min.js"));
    // An icon of its own (empty), so browsers ask for no /favicon.ico.
    assert!(html.contains(r#"<link rel="icon" href="data:,">"#));
    assert!(
        !html.contains("https://"),
        "the page must not need the network"
    );
    let js = reqwest::get(gw.http_url("/static/stomp.umd.min.js"))
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.text().await.unwrap().contains("StompJs"));
    let license = reqwest::get(gw.http_url("/static/stompjs-LICENSE"))
        .await
        .unwrap();
    assert!(license.text().await.unwrap().contains("Apache License"));
    gw.stop().await;
}

/// Every series with a fixed label set is there from the start, at 0, so
/// that rates and alerts work before the first event.
#[tokio::test]
async fn labelled_series_are_there_at_zero_from_the_start() {
    let gw = Gateway::start().await;
    let metrics = scrape(&gw).await;
    for reason in stompgate::metrics::ERROR_REASONS {
        let series = format!("stompgate_errors_total{{reason=\"{reason}\"}}");
        assert_eq!(metrics.get(&series), Some(&0.0), "{series}");
    }
    for limit in stompgate::metrics::REFUSAL_LIMITS {
        let series = format!("stompgate_refusals_total{{limit=\"{limit}\"}}");
        assert_eq!(metrics.get(&series), Some(&0.0), "{series}");
    }
    for series in [
        "stompgate_acked_consumption_total{reason=\"backlog\"}",
        "stompgate_presence_published_total{op=\"join\"}",
        "stompgate_sessions{version=\"1.0\"}",
        "stompgate_frames_received_total{command=\"SEND\"}",
        "stompgate_frames_sent_total{command=\"ERROR\"}",
    ] {
        assert_eq!(metrics.get(series), Some(&0.0), "{series}");
    }
    gw.stop().await;
}
