//! The source document's newspaper, end to end over real WebSockets and the
//! real RabbitMQ: channels, wildcards, receipts, bodies of every kind.

mod common;

use bytes::Bytes;
use common::{body_text, reader_and_writer, unique, Client, Gateway};
use stompgate::stomp::frame::Frame;

/// Users 1 and 2 read `no01`, user 3 reads `no02`: each gets exactly its
/// paper's issues, in order. A last issue of `no02` marks the end for user
/// 3, so "nothing else arrived" needs no sleep.
#[tokio::test]
async fn newspaper_readers_get_exactly_their_paper_in_order() {
    let gw = Gateway::start().await;
    let (mut user1, _) = Client::connect(&gw).await;
    let (mut user2, _) = Client::connect(&gw).await;
    let (mut user3, _) = Client::connect(&gw).await;
    user1.subscribe("paper", "/topic/no01").await;
    user2.subscribe("paper", "/topic/no01").await;
    user3.subscribe("paper", "/topic/no02").await;

    let (mut publisher, _) = Client::connect(&gw).await;
    for i in 0..20 {
        publisher
            .send("/topic/no01", &format!("no01 issue {i}"))
            .await;
    }
    let receipt = publisher
        .send_confirmed("/topic/no02", "no02 issue 0")
        .await;
    assert_eq!(receipt.get("routed"), Some("true"));

    for reader in [&mut user1, &mut user2] {
        for i in 0..20 {
            let message = reader.recv_message().await;
            assert_eq!(body_text(&message), format!("no01 issue {i}"));
            assert_eq!(message.get("destination"), Some("/topic/no01"));
            assert_eq!(message.get("subscription"), Some("paper"));
        }
    }
    let message = user3.recv_message().await;
    assert_eq!(body_text(&message), "no02 issue 0");
    assert_eq!(message.get("destination"), Some("/topic/no02"));
    // Readers of no01 must not have no02: it would come before this marker.
    publisher.send("/topic/no01", "no01 end").await;
    for reader in [&mut user1, &mut user2] {
        assert_eq!(body_text(&reader.recv_message().await), "no01 end");
    }
    for client in [user1, user2, user3, publisher] {
        client.disconnect().await;
    }
    gw.stop().await;
}

/// The source document's names: subscribe on /sub/, publish on /pub/; the
/// MESSAGE carries the subscription's prefix.
#[tokio::test]
async fn sub_and_pub_names_work_like_topic() {
    let gw = Gateway::start().await;
    let key = unique("paper");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/sub/{key}"), "auto").await;
    let receipt = writer.send_confirmed(&format!("/pub/{key}"), "hello").await;
    assert_eq!(receipt.get("routed"), Some("true"));
    let message = reader.recv_message().await;
    assert_eq!(body_text(&message), "hello");
    assert_eq!(
        message.get("destination"),
        Some(format!("/sub/{key}").as_str())
    );
    // /topic/ reaches /sub/ readers too: one exchange behind both.
    writer.send(&format!("/topic/{key}"), "via topic").await;
    assert_eq!(body_text(&reader.recv_message().await), "via topic");
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Overlapping and wildcard subscriptions on one connection: a message is
/// delivered once per matching subscription, each with its own header.
#[tokio::test]
async fn overlapping_and_wildcard_subscriptions_each_get_a_copy() {
    let gw = Gateway::start().await;
    let root = unique("news");
    let (mut reader, _) = Client::connect(&gw).await;
    reader
        .subscribe("exact", &format!("/topic/{root}.sport"))
        .await;
    reader.subscribe("star", &format!("/topic/{root}.*")).await;
    reader.subscribe("hash", &format!("/topic/{root}.#")).await;
    reader
        .subscribe("same", &format!("/topic/{root}.sport"))
        .await;

    let (mut writer, _) = Client::connect(&gw).await;
    writer.send(&format!("/topic/{root}.sport"), "goal").await;
    let mut subscriptions: Vec<String> = Vec::new();
    for _ in 0..4 {
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), "goal");
        assert_eq!(
            message.get("destination"),
            Some(format!("/topic/{root}.sport").as_str())
        );
        subscriptions.push(message.get("subscription").unwrap().to_owned());
    }
    assert_eq!(subscriptions, ["exact", "star", "hash", "same"]);

    // Two levels deep: only '#' matches.
    writer
        .send(&format!("/topic/{root}.sport.football"), "deep")
        .await;
    let message = reader.recv_message().await;
    assert_eq!(message.get("subscription"), Some("hash"));
    assert_eq!(body_text(&message), "deep");
    writer.send(&format!("/topic/{root}.weather"), "rain").await;
    for expected in ["star", "hash"] {
        let message = reader.recv_message().await;
        assert_eq!(message.get("subscription"), Some(expected));
        assert_eq!(body_text(&message), "rain");
    }
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// The source document's first caveat, reported: a RECEIPT says whether
/// any queue took the message.
#[tokio::test]
async fn receipts_tell_routed_and_unroutable() {
    let gw = Gateway::start().await;
    let key = unique("nobody");
    let (mut writer, _) = Client::connect(&gw).await;
    let receipt = writer
        .send_confirmed(&format!("/topic/{key}"), "anyone?")
        .await;
    assert_eq!(receipt.get("routed"), Some("false"));

    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &format!("/topic/{key}")).await;
    let receipt = writer
        .send_confirmed(&format!("/topic/{key}"), "hello")
        .await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&reader.recv_message().await), "hello");
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_keeps_shared_binding() {
    let gw = Gateway::start().await;
    let key = unique("k");
    let dest = format!("/topic/{key}");
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("a", &dest).await;
    reader.subscribe("b", &dest).await;
    let (mut writer, _) = Client::connect(&gw).await;

    reader.unsubscribe("a").await;
    // "b" shares the binding: it still receives, and only once.
    writer.send(&dest, "one").await;
    let message = reader.recv_message().await;
    assert_eq!(message.get("subscription"), Some("b"));
    assert_eq!(body_text(&message), "one");

    reader.unsubscribe("b").await;
    let receipt = writer.send_confirmed(&dest, "two").await;
    assert_eq!(receipt.get("routed"), Some("false"), "binding must be gone");
    // Nothing for the reader: the next frame it sees is its own receipt.
    reader
        .send_frame(
            &Frame::new("BEGIN")
                .header("transaction", "t")
                .header("receipt", "mark"),
        )
        .await;
    reader.expect_receipt("mark").await;
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Header values with ':' '\n' '\\' and Korean text survive both ways;
/// frames of valid UTF-8 travel as text WebSocket messages.
#[tokio::test]
async fn escaped_headers_and_korean_text() {
    let gw = Gateway::start().await;
    let key = unique("ko");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    let body = "조선일보 신문 no01: 구독자는 자신이 구독한 채널의 메시지만 수신 가능";
    let tricky = "a:b\nc\\d\re 한겨레";
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", format!("/topic/{key}"))
                .header("x-note", tricky)
                .header("content-type", "text/plain;charset=utf-8")
                .body(Bytes::copy_from_slice(body.as_bytes())),
        )
        .await;
    let message = reader.recv_message().await;
    assert_eq!(body_text(&message), body);
    assert_eq!(message.get("x-note"), Some(tricky));
    assert_eq!(
        message.get("content-type"),
        Some("text/plain;charset=utf-8")
    );
    // Nothing else but who sent it: the stamp the gateway puts on each
    // publish (to match returns) stays behind, and no header comes twice.
    let mut names: Vec<&str> = message.headers.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "content-length",
            "content-type",
            "destination",
            "message-id",
            "stompgate-sender-session",
            "subscription",
            "x-note"
        ]
    );
    assert_eq!(reader.kinds.last(), Some(&"text"));
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// A body with NULs needs content-length; it comes back intact, as a
/// binary WebSocket message since it is not UTF-8.
#[tokio::test]
async fn binary_body_with_nuls() {
    let gw = Gateway::start().await;
    let key = unique("bin");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    let body: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, 0xfe, 0]).collect();
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", format!("/topic/{key}"))
                .header("content-type", "application/octet-stream")
                .body(body.clone()),
        )
        .await;
    let message = reader.recv_message().await;
    assert_eq!(message.body.as_ref(), body.as_slice());
    assert_eq!(
        message.get("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(reader.kinds.last(), Some(&"binary"));
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn one_mebibyte_body() {
    let gw = Gateway::start().await;
    let key = unique("big");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    let body: String = (0..(1 << 20))
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let receipt = writer.send_confirmed(&format!("/topic/{key}"), &body).await;
    assert_eq!(receipt.get("routed"), Some("true"));
    let message = reader.recv_message().await;
    assert_eq!(message.body.len(), 1 << 20);
    assert!(body_text(&message) == body, "1 MiB body changed on the way");
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn two_thousand_messages_arrive_in_order() {
    let gw = Gateway::start().await;
    let key = unique("seq");
    let (mut reader, mut writer) = reader_and_writer(&gw, &format!("/topic/{key}"), "auto").await;
    for i in 0..2000 {
        writer.send(&format!("/topic/{key}"), &i.to_string()).await;
    }
    for i in 0..2000 {
        let message = reader.recv_message().await;
        assert_eq!(
            body_text(&message),
            i.to_string(),
            "message {i} out of order"
        );
    }
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// Exact bytes of what the server sends, so the encoder's output is pinned
/// independently of the decoder the test client uses.
#[tokio::test]
async fn golden_server_frames() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let gw = Gateway::start().await;
    let key = unique("gold");
    let mut client = Client::open(&gw).await;
    assert_eq!(client.subprotocol.as_deref(), Some("v12.stomp"));
    let ws = &mut client.ws;
    ws.send(Message::text("CONNECT\naccept-version:1.2\nhost:/\n\n\0"))
        .await
        .unwrap();
    let Some(Ok(Message::Text(connected))) = ws.next().await else {
        panic!("no CONNECTED text message");
    };
    let session = connected
        .lines()
        .find_map(|l| l.strip_prefix("session:"))
        .unwrap()
        .to_owned();
    let expected = format!(
        "CONNECTED\nversion:1.2\nheart-beat:0,0\nsession:{session}\nserver:stompgate/{}\n\n\0",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(connected.as_str(), expected);

    let subscribe = format!("SUBSCRIBE\nid:0\ndestination:/topic/{key}\nreceipt:r1\n\n\0");
    ws.send(Message::text(subscribe)).await.unwrap();
    let Some(Ok(Message::Text(receipt))) = ws.next().await else {
        panic!("no RECEIPT");
    };
    assert_eq!(receipt.as_str(), "RECEIPT\nreceipt-id:r1\n\n\0");

    let send = format!("SEND\ndestination:/topic/{key}\nx-a:1\\c2\n\nhi\0");
    ws.send(Message::text(send)).await.unwrap();
    let Some(Ok(Message::Text(message))) = ws.next().await else {
        panic!("no MESSAGE");
    };
    assert_eq!(
        message.as_str(),
        format!(
            "MESSAGE\nsubscription:0\nmessage-id:0\ndestination:/topic/{key}\n\
             stompgate-sender-session:{session}\nx-a:1\\c2\ncontent-length:2\n\nhi\0"
        )
    );
    client.disconnect().await;
    gw.stop().await;
}

/// The reason for the design: two gateway nodes on one RabbitMQ share the
/// newspaper with no state of their own. A reader on one node gets what a
/// writer on the other sends.
#[tokio::test]
async fn two_nodes_share_the_newspaper() {
    let node_a = Gateway::start().await;
    let node_b = Gateway::start().await;
    assert_ne!(node_a.config.server.node_id, node_b.config.server.node_id);
    let key = unique("scale");
    let (mut reader_a, _) = Client::connect(&node_a).await;
    reader_a.subscribe("s", &format!("/sub/{key}")).await;
    let (mut reader_b, _) = Client::connect(&node_b).await;
    reader_b.subscribe("s", &format!("/sub/{key}")).await;
    let (mut writer_b, _) = Client::connect(&node_b).await;
    for i in 0..10 {
        writer_b
            .send(&format!("/pub/{key}"), &format!("from B {i}"))
            .await;
    }
    for reader in [&mut reader_a, &mut reader_b] {
        for i in 0..10 {
            assert_eq!(
                body_text(&reader.recv_message().await),
                format!("from B {i}")
            );
        }
    }
    for client in [reader_a, reader_b, writer_b] {
        client.disconnect().await;
    }
    node_a.stop().await;
    node_b.stop().await;
}

/// Receipts of pipelined SENDs, routed and unroutable interleaved, each say
/// `routed` for their own message, even when the broker confirms several at
/// once and reports returns along with other messages' confirms.
#[tokio::test]
async fn routed_is_exact_for_pipelined_sends() {
    let gw = Gateway::start().await;
    let read = unique("read");
    let nobody = unique("nobody");
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &format!("/topic/{read}")).await;
    let (mut writer, _) = Client::connect(&gw).await;
    let frames: String = (0..400)
        .map(|i| {
            let key = if i % 3 == 0 { &nobody } else { &read };
            format!("SEND\ndestination:/topic/{key}\nreceipt:{i}\n\n{i}\0")
        })
        .collect();
    writer.send_raw(frames.as_bytes()).await;
    for i in 0..400 {
        let receipt = writer.expect_receipt(&i.to_string()).await;
        let expected = if i % 3 == 0 { "false" } else { "true" };
        assert_eq!(receipt.get("routed"), Some(expected), "receipt {i}");
    }
    for i in (0..400).filter(|i| i % 3 != 0) {
        assert_eq!(body_text(&reader.recv_message().await), i.to_string());
    }
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}
