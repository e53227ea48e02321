//! Addressed messages (issue 16, the seed's `receiver`), across nodes and
//! through RabbitMQ only: a SEND to `/user/<user>/queue/<name>` reaches
//! every session of that user subscribed to `/user/queue/<name>`, on any
//! node; one to `/session/<id>/queue/<name>` reaches that session alone.
//! Nobody there: `routed:false`. Two gateway nodes, one in this process
//! and one a process of its own, share the local RabbitMQ.

mod common;

use std::sync::OnceLock;

use common::{body_text, unique, Client, Gateway, Node, WAIT};
use stompgate::auth::{hash_password, AuthMode, UserConfig};
use stompgate::stomp::frame::Frame;

/// A session of `login` (auth.mode = "none": the login names the user)
/// subscribed to `/user/queue/<name>`, with its session id.
async fn inbox(gw: &Gateway, login: &str, name: &str) -> (Client, String) {
    let mut client = Client::open(gw).await;
    let session = client
        .handshake(
            Frame::new("CONNECT")
                .header("accept-version", "1.2")
                .header("login", login),
        )
        .await;
    client.subscribe("in", &format!("/user/queue/{name}")).await;
    (client, session)
}

/// SEND with a receipt; the RECEIPT's `routed`.
async fn send(client: &mut Client, destination: &str, body: &str) -> String {
    let receipt = unique("r");
    client
        .send_frame(
            &Frame::new("SEND")
                .header("destination", destination)
                .header("receipt", receipt.as_str())
                .body(body.as_bytes().to_vec()),
        )
        .await;
    let frame = client.expect_receipt(&receipt).await;
    frame.get("routed").expect("routed header").to_owned()
}

#[tokio::test]
async fn a_user_destination_reaches_every_session_of_the_user_on_every_node() {
    // Two nodes: one in this process, one a process of its own.
    let gw1 = Gateway::start().await;
    let node2 = Node::spawn(&[]);
    let gw2 = &node2.gateway;
    let (ann, bob) = (unique("ann"), unique("bob"));
    let (mut ann1, _) = inbox(&gw1, &ann, "inbox").await;
    let (mut ann2, _) = inbox(gw2, &ann, "inbox").await;
    let (mut bob1, _) = inbox(&gw1, &bob, "inbox").await;
    // Another queue name of ann's: not this one.
    let (mut ann_other, _) = inbox(gw2, &ann, "other").await;
    let (mut writer, writer_session) = Client::connect(gw2).await;

    let routed = send(&mut writer, &format!("/user/{ann}/queue/inbox"), "for ann").await;
    assert_eq!(routed, "true");
    for reader in [&mut ann1, &mut ann2] {
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), "for ann");
        assert_eq!(message.get("destination"), Some("/user/queue/inbox"));
        assert_eq!(message.get("subscription"), Some("in"));
        assert_eq!(
            message.get("stompgate-sender-session"),
            Some(writer_session.as_str())
        );
    }
    // Markers sent after it reach bob and ann's other queue first: had
    // "for ann" reached them, it would have come before.
    send(&mut writer, &format!("/user/{bob}/queue/inbox"), "for bob").await;
    send(&mut writer, &format!("/user/{ann}/queue/other"), "other").await;
    assert_eq!(body_text(&bob1.recv_message().await), "for bob");
    assert_eq!(body_text(&ann_other.recv_message().await), "other");

    // Nobody of that name, or nobody reading that queue: routed:false.
    let nobody = unique("nobody");
    assert_eq!(
        send(&mut writer, &format!("/user/{nobody}/queue/inbox"), "?").await,
        "false"
    );
    assert_eq!(
        send(&mut writer, &format!("/user/{bob}/queue/never"), "?").await,
        "false"
    );
    // Once ann's sessions unsubscribe, nothing reaches her queue.
    for reader in [&mut ann1, &mut ann2] {
        reader.unsubscribe("in").await;
    }
    assert_eq!(
        send(&mut writer, &format!("/user/{ann}/queue/inbox"), "late").await,
        "false"
    );
    for client in [ann1, ann2, bob1, ann_other, writer] {
        client.disconnect().await;
    }
    gw1.stop().await;
}

#[tokio::test]
async fn a_session_destination_reaches_that_session_alone() {
    // Two nodes: one in this process, one a process of its own.
    let gw1 = Gateway::start().await;
    let node2 = Node::spawn(&[]);
    let gw2 = &node2.gateway;
    let ann = unique("ann");
    let (mut first, first_session) = inbox(&gw1, &ann, "inbox").await;
    let (mut second, second_session) = inbox(gw2, &ann, "inbox").await;
    let (mut writer, _) = Client::connect(&gw1).await;
    let to = |session: &str| format!("/session/{session}/queue/inbox");
    assert_eq!(
        send(&mut writer, &to(&second_session), "to the second").await,
        "true"
    );
    assert_eq!(
        send(&mut writer, &to(&first_session), "to the first").await,
        "true"
    );
    // The first gets only its own; the second its own.
    assert_eq!(body_text(&first.recv_message().await), "to the first");
    let message = second.recv_message().await;
    assert_eq!(body_text(&message), "to the second");
    assert_eq!(message.get("destination"), Some("/user/queue/inbox"));
    // A session that is not there (or has gone): routed:false.
    assert_eq!(send(&mut writer, &to("000000000000"), "?").await, "false");
    // Gone: its queue goes after its DISCONNECT is answered, so ask until
    // RabbitMQ has dropped it.
    first.disconnect().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while send(&mut writer, &to(&first_session), "?").await != "false" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a session gone for {WAIT:?} still takes its messages"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    second.disconnect().await;
    writer.disconnect().await;
    gw1.stop().await;
}

#[tokio::test]
async fn springs_topic_and_exchange_user_destinations_work_like_queues() {
    let gw1 = Gateway::start().await;
    let node2 = Node::spawn(&[]);
    let ann = unique("ann");
    // One session of ann's per node, each with the three forms of an
    // inbox of the same name: each form is an inbox of its own.
    let forms = [
        "/user/queue/news",
        "/user/topic/news",
        "/user/exchange/amq.direct/news",
    ];
    let mut sessions = Vec::new();
    for gw in [&gw1, &node2.gateway] {
        let mut client = Client::open(gw).await;
        let session = client
            .handshake(
                Frame::new("CONNECT")
                    .header("accept-version", "1.2")
                    .header("login", ann.as_str()),
            )
            .await;
        for (i, form) in forms.iter().enumerate() {
            client.subscribe(&format!("s{i}"), form).await;
        }
        sessions.push((client, session));
    }
    let (mut writer, _) = Client::connect(&gw1).await;
    for (i, form) in forms.iter().enumerate() {
        // To the user: both sessions, on that form's subscription alone.
        let tail = form.strip_prefix("/user/").unwrap();
        let to_user = format!("/user/{ann}/{tail}");
        assert_eq!(
            send(&mut writer, &to_user, &format!("user {i}")).await,
            "true"
        );
        for (client, _) in sessions.iter_mut() {
            let message = client.recv_message().await;
            assert_eq!(body_text(&message), format!("user {i}"));
            assert_eq!(message.get("destination"), Some(*form));
            assert_eq!(message.get("subscription"), Some(format!("s{i}").as_str()));
        }
        // To the second session alone.
        let to_session = format!("/session/{}/{tail}", sessions[1].1);
        assert_eq!(
            send(&mut writer, &to_session, &format!("session {i}")).await,
            "true"
        );
        let message = sessions[1].0.recv_message().await;
        assert_eq!(body_text(&message), format!("session {i}"));
        assert_eq!(message.get("destination"), Some(*form));
    }
    // Nothing else came to the first session: a marker is next.
    let to_first = format!("/session/{}/queue/news", sessions[0].1);
    send(&mut writer, &to_first, "marker").await;
    assert_eq!(body_text(&sessions[0].0.recv_message().await), "marker");
    // A form nobody subscribed to: routed:false.
    let nobody = format!("/user/{ann}/exchange/amq.fanout/news");
    assert_eq!(send(&mut writer, &nobody, "?").await, "false");
    for (client, _) in sessions {
        client.disconnect().await;
    }
    writer.disconnect().await;
    gw1.stop().await;
}

#[tokio::test]
async fn addressed_destinations_are_checked() {
    let gw = Gateway::start().await;
    for (destination, message) in [
        ("/user/a.b/queue/inbox", "invalid destination"),
        ("/user/queue/inbox", "invalid destination"),
        ("/session/x/other/inbox", "invalid destination"),
        ("/user/topic/inbox", "invalid destination"),
    ] {
        let (mut client, _) = Client::connect(&gw).await;
        client
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", destination)
                    .body(&b"x"[..]),
            )
            .await;
        let error = client.expect_error().await;
        assert_eq!(error.get("message"), Some(message), "{destination}");
    }
    // A user whose name cannot be a routing-key word has no /user/ queue.
    let mut client = Client::open(&gw).await;
    client
        .handshake(
            Frame::new("CONNECT")
                .header("accept-version", "1.2")
                .header("login", "a.b"),
        )
        .await;
    client
        .send_frame(
            &Frame::new("SUBSCRIBE")
                .header("id", "in")
                .header("destination", "/user/queue/inbox"),
        )
        .await;
    let error = client.expect_error().await;
    assert!(
        body_text(&error).contains("cannot be addressed"),
        "{error:?}"
    );
    gw.stop().await;
}

/// With auth.mode = "users" a user may write to its own queues, and to
/// another user's or a session's only as its publish grants on the direct
/// exchange say.
#[tokio::test]
async fn writing_to_others_needs_a_grant() {
    static HASH: OnceLock<String> = OnceLock::new();
    let hash = HASH.get_or_init(|| hash_password("pass").unwrap()).clone();
    let (ann, bob, eve) = (unique("ann"), unique("bob"), unique("eve"));
    let users = {
        let (ann, bob, eve) = (ann.clone(), bob.clone(), eve.clone());
        move |hash: String| {
            let user = |name: &str, publish: Vec<String>| UserConfig {
                name: name.to_owned(),
                password_hash: hash.clone(),
                subscribe: vec![],
                publish,
            };
            vec![
                user(&ann, vec![]),
                user(&bob, vec![format!("stompgate.direct/user.{ann}.*")]),
                user(&eve, vec![]),
            ]
        }
    };
    let gw = Gateway::start_with(move |c| {
        c.auth.mode = AuthMode::Users;
        c.auth.users = users(hash);
    })
    .await;
    let login = |name: &str| {
        Frame::new("CONNECT")
            .header("accept-version", "1.2")
            .header("login", name)
            .header("passcode", "pass")
    };
    let mut ann_reader = Client::open(&gw).await;
    ann_reader.handshake(login(&ann)).await;
    ann_reader.subscribe("in", "/user/queue/inbox").await;
    // Ann to herself, and bob (granted) to ann.
    let mut ann_writer = Client::open(&gw).await;
    ann_writer.handshake(login(&ann)).await;
    let to_ann = format!("/user/{ann}/queue/inbox");
    assert_eq!(send(&mut ann_writer, &to_ann, "note to self").await, "true");
    let mut bob_writer = Client::open(&gw).await;
    bob_writer.handshake(login(&bob)).await;
    assert_eq!(send(&mut bob_writer, &to_ann, "from bob").await, "true");
    assert_eq!(body_text(&ann_reader.recv_message().await), "note to self");
    let from_bob = ann_reader.recv_message().await;
    assert_eq!(body_text(&from_bob), "from bob");
    assert_eq!(from_bob.get("stompgate-sender-user"), Some(bob.as_str()));
    // Eve has no grant: refused, for a user and for a session alike.
    for destination in [to_ann.clone(), "/session/000000000000/queue/inbox".into()] {
        let mut eve_writer = Client::open(&gw).await;
        eve_writer.handshake(login(&eve)).await;
        eve_writer
            .send_frame(
                &Frame::new("SEND")
                    .header("destination", destination.as_str())
                    .body(&b"spam"[..]),
            )
            .await;
        let error = eve_writer.expect_error().await;
        assert_eq!(
            error.get("message"),
            Some("access refused"),
            "{destination}"
        );
    }
    for client in [ann_reader, ann_writer, bob_writer] {
        client.disconnect().await;
    }
    gw.stop().await;
}
